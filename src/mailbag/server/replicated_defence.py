"""Login defence that holds across workers: each worker's throttle is a replica.

A worker's ``ReplicatedThrottle`` is the ordinary ``FailureThrottle`` (same
delays, same counters, same reads with no round trip) whose changes are also
published to every other worker through the supervisor
(``server.shared_state``), and which applies the changes the others publish.
So ten guesses spread over four workers count as ten everywhere, exactly as
on one process, and a worker restarted after a crash replays the journal and
remembers them too.
"""

from __future__ import annotations

from mailbag.server.shared_state import StateClient
from mailbag.session.throttle import FailureThrottle

FAILURE = "throttle.failure"
SUCCESS = "throttle.success"


class ReplicatedThrottle(FailureThrottle):
    """A ``FailureThrottle`` kept in step with the other workers' throttles."""

    def __init__(
        self, state: StateClient, *, base: float, cap: float, window: float
    ) -> None:
        super().__init__(base=base, cap=cap, window=window)
        self._state = state
        state.on_change(FAILURE, self._apply_failure)
        state.on_change(SUCCESS, self._apply_success)

    def adopt_policy(self, other: FailureThrottle) -> ReplicatedThrottle:
        """SIGHUP: take a new policy (delays, window) and keep every counter."""
        self.base, self.cap, self.window = other.base, other.cap, other.window
        return self

    def record_failure(self, address: str, account: str) -> int:
        self._state.publish(FAILURE, address, account)
        return super().record_failure(address, account)

    def record_success(self, address: str, account: str) -> None:
        self._state.publish(SUCCESS, address, account)
        super().record_success(address, account)

    def _apply_failure(self, address: str, account: str) -> None:
        super().record_failure(address, account)

    def _apply_success(self, address: str, account: str) -> None:
        super().record_success(address, account)
