"""Which failures the replica-kill tests excuse (tests/integration/replica_kill.py), on recorded
timelines: the rule itself, so the integration tests cannot pass by excusing too much."""

from __future__ import annotations

from tests.integration.replica_kill import NOTICE_S, KillRun, Outcome

KILLED_S = 100.0


def _run(*outcomes: Outcome, gone_s: float = KILLED_S) -> KillRun:
    return KillRun(KILLED_S, gone_s, KILLED_S + 3, list(outcomes))


def test_a_request_sent_as_haproxy_fails_the_ones_in_flight_is_excused() -> None:
    # CI, 2026-12-01: two in flight failed 133 ms after SIGKILL; the next, sent 2.5 us later, too
    in_flight = [Outcome(99.98, 100.1318, "UNAVAILABLE"), Outcome(99.99, 100.1329, "UNAVAILABLE")]
    resent = Outcome(100.13296, 100.1416, "UNAVAILABLE")
    run = _run(*in_flight, resent, Outcome(100.2, 100.21, "OK"))
    assert run.unexcused == []
    assert run.in_flight_at_kill == in_flight
    assert abs(run.noticed_s - (100.1329 + NOTICE_S)) < 1e-9


def test_a_failure_after_the_window_is_not_excused() -> None:
    late = Outcome(100.1329 + NOTICE_S + 0.01, 100.3, "UNAVAILABLE")
    run = _run(Outcome(99.99, 100.1329, "UNAVAILABLE"), late)
    assert run.unexcused == [late]
    assert run.after == [late]


def test_a_failure_answered_before_the_kill_is_not_excused() -> None:
    early = Outcome(99.0, 99.5, "UNAVAILABLE")
    assert _run(early).unexcused == [early]


def test_without_failures_in_flight_the_window_ends_after_the_exit() -> None:
    run = _run(Outcome(100.0, 100.01, "OK"), gone_s=100.05)
    assert abs(run.noticed_s - (100.05 + NOTICE_S)) < 1e-9
    assert run.after == []
