"""Profile mailbag under one benchmark load: ``python bench/profile.py retr-large``.

Starts mailbag alone on the benchmark's data (``bench/run.py`` must have
created it), runs one load-generator scenario against it while ``py-spy
record`` samples the server, and writes a flame graph SVG (and, with
``--format speedscope``, a speedscope JSON).  Kept in the repo because every
optimisation in docs/benchmarks.md started from one of these profiles.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import data  # noqa: E402
import servers  # noqa: E402

SCENARIOS = {
    "retr-large": ["retr", "--user", "retrlarge", "--expect", "{work}/expect-large.json"],
    "retr-small": ["retr", "--user", "retrsmall", "--expect", "{work}/expect-small.json"],
    "sessions-c50": ["sessions", "--prefix", "splain", "--concurrency", "50"],
    "sessions-c1": ["sessions", "--prefix", "splain", "--concurrency", "1"],
    "bigbox": ["bigbox", "--user", "big"],
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("scenario", choices=sorted(SCENARIOS))
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp/mailbag-bench"))
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--out", type=Path, default=Path("/tmp/mailbag-profile.svg"))
    parser.add_argument("--format", default="flamegraph",
                        choices=("flamegraph", "speedscope", "raw"))
    parser.add_argument("--top", type=int, default=0,
                        help="also print the N functions with the most samples (self and "
                        "inclusive; needs --format raw)")
    parser.add_argument("--idle", action="store_true", help="sample idle threads too")
    parser.add_argument("--drop-index", action="store_true", help="bigbox: profile a cold open")
    args = parser.parse_args()
    work = args.workdir
    home = work / "profile"
    home.mkdir(exist_ok=True)
    server = servers.Mailbag(home, work / "mail", work / "users", 1000)
    if args.drop_index:
        (work / "mail" / "big" / "mailbag.index").unlink(missing_ok=True)
    server.start()
    assert server.proc is not None
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    record = subprocess.Popen([spy, "record", "-p", str(server.proc.pid), "-o", str(args.out),
                               "--format", args.format, "-r", "200", "--nonblocking",
                               *(["--idle"] if args.idle else [])])
    try:
        argv = [a.format(work=work) for a in SCENARIOS[args.scenario]]
        if args.scenario != "bigbox":
            argv += ["--seconds", str(args.seconds)]
        out = subprocess.run([sys.executable, str(HERE / "load.py"), "--port", str(server.port),
                              "--password", data.PASSWORD, *argv],
                             capture_output=True, text=True, check=True)
        print(out.stdout.strip())
    finally:
        server.stop()
        record.wait(timeout=60)
    print(f"profile in {args.out}")
    if args.top and args.format == "raw":
        print(top_entries(args.out, args.top))
    return 0


def top_entries(path: Path, count: int) -> str:
    """The functions with the most samples in a raw (collapsed stacks) profile."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, samples = line.rpartition(" ")
        n = int(samples)
        total += n
        frames = stack.split(";")
        own[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
    lines = [f"{total} samples; self:"]
    lines += [f"  {n * 100 / total:5.1f}%  {f}" for f, n in own.most_common(count)]
    lines.append("inclusive:")
    lines += [f"  {n * 100 / total:5.1f}%  {f}" for f, n in inclusive.most_common(count)]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
