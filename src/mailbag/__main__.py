"""Allow ``python -m mailbag``."""

from mailbag.cli.main import run

run()
