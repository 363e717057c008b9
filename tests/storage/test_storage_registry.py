"""The backend registry, and the layering rule that storage imports nothing above it."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from mailbag.errors import ConfigError
from mailbag.storage import registry
from mailbag.storage.maildir import MaildirStore
from mailbag.storage.memory import MemoryStore
from tests.storage.helpers import subprocess_env

STORAGE = Path(registry.__file__).parent


def test_builtin_backends_by_name(tmp_path: Path) -> None:
    assert {"maildir", "memory"} <= set(registry.available())
    assert isinstance(registry.create("memory"), MemoryStore)
    store = registry.create("maildir", maildir=str(tmp_path / "{user}"))
    assert isinstance(store, MaildirStore)


def test_unknown_backend_or_option_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"available: .*maildir"):
        registry.create("mbox")
    with pytest.raises(ConfigError, match="memory"):
        registry.create("memory", bogus=1)


def test_postgres_backend_by_name_is_lazy() -> None:
    """Choosing Maildir never imports asyncpg; choosing postgres needs a DSN."""
    code = (
        "import sys; from mailbag.storage import registry; "
        "registry.create('maildir', maildir='/tmp/x/{user}'); "
        "assert 'asyncpg' not in sys.modules, 'maildir imported asyncpg'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env=subprocess_env())
    with pytest.raises(ConfigError, match="dsn"):
        registry.create("postgres")


def test_register_refuses_to_shadow() -> None:
    with pytest.raises(ValueError):
        registry.register("memory", MemoryStore)


@pytest.mark.parametrize(
    "module", sorted(str(p.relative_to(STORAGE)) for p in STORAGE.rglob("*.py"))
)
def test_storage_imports_only_errors_wireform_and_stdlib(module: str) -> None:
    # mailbag.database: the PostgreSQL pool and schema, a bottom layer shared with auth.
    allowed = ("mailbag.errors", "mailbag.wireform", "mailbag.storage", "mailbag.database")
    tree = ast.parse((STORAGE / module).read_text())
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        for name in names:
            if name.startswith("mailbag"):
                assert name.startswith(allowed), f"{module} imports {name}"
