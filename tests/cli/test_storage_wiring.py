"""The server's wiring builds whatever storage backend the config names (issue 10)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mailbag.cli.check_cmd import check_config
from mailbag.cli.wiring import build_runtime, build_store, store_problems
from mailbag.config import config_from_dict
from mailbag.errors import ConfigError
from mailbag.storage import registry
from mailbag.storage.memory import MemoryStore


class TaggedStore(MemoryStore):
    """A backend defined by the test: a memory store remembering its options."""

    def __init__(self, *, tag: str = "", copies: int = 1) -> None:
        super().__init__()
        self.tag, self.copies = tag, copies


@pytest.fixture
def tagged() -> Iterator[list[TaggedStore]]:
    made: list[TaggedStore] = []

    def factory(**options: Any) -> TaggedStore:
        made.append(TaggedStore(**options))
        return made[-1]

    registry.register("tagged", factory, settings=("tag", "copies"))
    yield made
    registry.unregister("tagged")


def config(tmp_path: Path, storage: dict[str, Any]) -> Any:
    return config_from_dict(
        {"storage": storage, "auth": {"users_file": "users"}}, path=tmp_path / "mailbag.toml"
    )


def test_backend_registered_under_new_name_is_built_from_config(
    tagged: list[TaggedStore], tmp_path: Path
) -> None:
    runtime = build_runtime(config(tmp_path, {"backend": "tagged", "tag": "blue", "copies": 3}))
    assert runtime.store is tagged[-1]
    assert (tagged[-1].tag, tagged[-1].copies) == ("blue", 3)
    # storage.maildir (always present, with its default) is not forced on a backend.
    assert not (tmp_path / "mail").exists()
    assert store_problems(runtime.store) == []


def test_unknown_storage_option_names_key_and_backend(
    tagged: list[TaggedStore], tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match=r"storage\.colour: not a setting of the 'tagged'.*"
                                          r"copies, tag"):
        build_store(config(tmp_path, {"backend": "tagged", "colour": "red"}))
    with pytest.raises(ConfigError, match=r"storage\.bogus: .*'maildir'.*\(its settings: maildir"):
        build_store(config(tmp_path, {"bogus": 1}))
    with pytest.raises(ConfigError, match=r"storage\.backend: unknown backend 'mbox'.*tagged"):
        build_store(config(tmp_path, {"backend": "mbox"}))


def test_check_validates_storage_through_registry(
    tagged: list[TaggedStore], tmp_path: Path
) -> None:
    report = check_config(config(tmp_path, {"backend": "tagged", "colour": "red"}))
    assert report.failed
    assert any(level == "FAIL" and "storage.colour" in text for level, text in report.lines)
    report = check_config(config(tmp_path, {"backend": "tagged"}))
    assert ("ok", "storage: tagged") in report.lines
    report = check_config(config(tmp_path, {}))
    assert ("ok", f"storage: {tmp_path / 'mail'} (will be created)") in report.lines


def test_maildir_root_problems_reported_by_store(tmp_path: Path) -> None:
    store = build_store(config(tmp_path, {"maildir": str(tmp_path / "m" / "{user}")}))
    assert store_problems(store) == [f"mail root {tmp_path / 'm'} not writable"]
    build_runtime(config(tmp_path, {"maildir": str(tmp_path / "m" / "{user}")}))
    assert store_problems(store) == []


class _Listener:
    """Stands in for a listener: a reload only reconfigures it."""

    def reconfigure(self, service: object, **_: object) -> None:
        self.service = service


def test_sighup_keeps_the_store_unless_its_settings_changed(
    tagged: list[TaggedStore], tmp_path: Path
) -> None:
    """A reload must not replace a store whose settings are unchanged.

    A store can hold state that open sessions depend on (PostgreSQL's lease
    keeper: its node id and heartbeat keep their locks alive), and a second
    one would mean a second pool.
    """
    from mailbag.cli.reload import Service

    (tmp_path / "users").write_text("")
    configs = [config(tmp_path, {"backend": "tagged", "tag": "blue"})]
    service = Service(build_runtime(configs[0]), _Listener(),  # type: ignore[arg-type]
                      load_config=lambda: configs[-1])
    first = service.runtime.store
    configs.append(config(tmp_path, {"backend": "tagged", "tag": "blue"}))
    assert service.reload()
    assert service.runtime.store is first and len(tagged) == 1
    configs.append(config(tmp_path, {"backend": "tagged", "tag": "green"}))
    assert service.reload()
    assert service.runtime.store is tagged[-1] is not first
    assert tagged[-1].tag == "green"
