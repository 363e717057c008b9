"""Small helpers shared by the command modules."""

from __future__ import annotations

import argparse
import getpass
import sys
from pathlib import Path

from mailbag.config import CONFIG_ENV, Config, load_config
from mailbag.errors import MailbagError


class UsageError(MailbagError):
    """A command was used wrongly; exit status 2 like argparse."""

    exit_code = 2


def add_config_option(parser: argparse.ArgumentParser) -> None:
    """``-c/--config FILE``, defaulting to ``$MAILBAG_CONFIG`` or ``./mailbag.toml``."""
    parser.add_argument(
        "-c",
        "--config",
        metavar="FILE",
        type=Path,
        default=None,
        help=f"config file (default: ${CONFIG_ENV} or ./mailbag.toml)",
    )


def config_from_args(args: argparse.Namespace) -> Config:
    """Load the config named by ``--config`` (or the defaults)."""
    return load_config(args.config)


def read_new_password(*, from_stdin: bool, prompt: str = "New password: ") -> str:
    """Read a password from stdin (one line) or an interactive, non-echoing prompt."""
    if from_stdin:
        line = sys.stdin.readline()
        password = line.rstrip("\r\n")
    else:
        if not sys.stdin.isatty():
            raise UsageError("no terminal to ask for the password; use --password-stdin")
        password = getpass.getpass(prompt)
        if getpass.getpass("Repeat password: ") != password:
            raise UsageError("passwords do not match")
    if not password:
        raise UsageError("empty password refused")
    return password
