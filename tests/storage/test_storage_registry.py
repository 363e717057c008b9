"""The backend registry, and the layering rule that storage imports nothing above it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from mailbag.errors import ConfigError
from mailbag.storage import registry
from mailbag.storage.maildir import MaildirStore
from mailbag.storage.memory import MemoryStore

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


def test_register_refuses_to_shadow() -> None:
    with pytest.raises(ValueError):
        registry.register("memory", MemoryStore)


@pytest.mark.parametrize("module", sorted(p.name for p in STORAGE.glob("*.py")))
def test_storage_imports_only_errors_wireform_and_stdlib(module: str) -> None:
    allowed = ("mailbag.errors", "mailbag.wireform", "mailbag.storage")
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
