"""Prometheus metrics summed over worker processes, served by the supervisor.

Each worker keeps its ordinary ``Metrics`` (``server.metrics``); because the
supervisor starts it with ``PROMETHEUS_MULTIPROC_DIR`` pointing at a private
directory, prometheus-client stores every value in a small memory-mapped file
per process there instead of in process memory.  The supervisor serves
``/metrics`` by reading them all (``MultiProcessCollector``): counters and
histograms add up, ``mailbag_connections_current`` sums over live workers, and
``mailbag_worker_connections{worker="N"}`` shows how connections spread.  A
dead worker's counters stay counted (they are totals); its live gauges are
dropped (``worker_exited``).  The directory is created empty for each start
(stale files from another run would be summed in) and removed at exit.
"""

from __future__ import annotations

import importlib
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from mailbag import __version__
from mailbag.server.metrics import load_prometheus

#: The variable prometheus-client reads in each worker.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


class WorkersExposition:
    """The supervisor's ``/metrics``: every worker's metrics plus the supervisor's own."""

    def __init__(self, status: Callable[[], tuple[int, int, int]]) -> None:
        """``status`` returns (workers running, workers configured, restarts so far)."""
        self._prom = load_prometheus()
        self._multiprocess = importlib.import_module("prometheus_client.multiprocess")
        self.directory = Path(tempfile.mkdtemp(prefix="mailbag-metrics-"))
        self._status = status
        self._started = time.time()
        registry = self._prom.CollectorRegistry(auto_describe=False)
        self._multiprocess.MultiProcessCollector(registry, path=str(self.directory))
        registry.register(self)  # collect() below
        self.registry = registry

    def collect(self) -> Iterator[Any]:
        """The supervisor's own series (custom collector: no files of its own needed)."""
        core = importlib.import_module("prometheus_client.core")
        running, configured, restarts = self._status()
        info = core.InfoMetricFamily("mailbag", "mailbag build information")
        info.add_metric([], {"version": __version__})
        yield info
        yield core.GaugeMetricFamily("mailbag_workers", "Worker processes running", running)
        yield core.GaugeMetricFamily(
            "mailbag_workers_configured", "Worker processes configured (server.workers)",
            configured,
        )
        yield core.CounterMetricFamily(
            "mailbag_worker_restarts", "Workers restarted after they exited", restarts
        )
        yield core.GaugeMetricFamily(
            "mailbag_supervisor_start_time_seconds", "Unix time the supervisor started",
            self._started,
        )

    def worker_exited(self, pid: int) -> None:
        """Drop a dead worker's live gauges (its counters keep counting in the sums)."""
        self._multiprocess.mark_process_dead(pid, str(self.directory))

    def wsgi_app(self) -> Any:
        """prometheus-client's exposition app over every worker's files (``/metrics``)."""
        return self._prom.make_wsgi_app(self.registry)

    def close(self) -> None:
        """Remove the files (at exit)."""
        shutil.rmtree(self.directory, ignore_errors=True)
