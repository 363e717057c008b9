"""What a session reports for monitoring, and the counters for its logout line.

``server.metrics.Metrics`` implements ``SessionObserver``; without metrics,
sessions report to ``NULL_OBSERVER``, which does nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol


class SessionObserver(Protocol):
    """What a session reports for monitoring (``server.metrics.Metrics`` implements it).

    Optional: without one, sessions report to ``NULL_OBSERVER``, which does nothing.
    Arguments are server-chosen words (results, mechanisms, command names), never
    client text, so a monitoring system cannot be flooded with label values.
    """

    def login(self, result: str, mechanism: str) -> None:
        """A login finished: ``ok``, ``failed``, ``in_use`` or ``error``."""

    def commands(self, counts: Mapping[str, int]) -> None:
        """Commands received in the session, by name (reported at its end)."""

    def sent(self, octets: int) -> None:
        """Octets written to the client."""

    def storage_error(self, operation: str) -> None:
        """A storage operation failed: ``open``, ``read``, ``delete`` or ``close``."""

    def session_ended(self, seconds: float) -> None:
        """The session is over after ``seconds``."""


class _NullObserver:
    """The observer used when metrics are off."""

    def login(self, result: str, mechanism: str) -> None:
        pass

    def commands(self, counts: Mapping[str, int]) -> None:
        pass

    def sent(self, octets: int) -> None:
        pass

    def storage_error(self, operation: str) -> None:
        pass

    def session_ended(self, seconds: float) -> None:
        pass


NULL_OBSERVER: SessionObserver = _NullObserver()


@dataclass(slots=True)
class SessionStats:
    """Counters for the logout log line."""

    retrieved: int = 0
    octets_sent: int = 0
    deleted: int = 0
