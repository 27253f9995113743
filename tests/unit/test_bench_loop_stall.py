"""bench/loop_stall.py drives the replica's own request path (it must keep up with it)."""

from __future__ import annotations

import asyncio

from bench.loop_stall import ATTACK_BODIES, _run


def test_the_normal_client_and_the_attackers_are_answered() -> None:
    body = next(iter(ATTACK_BODIES.values()))
    result = asyncio.run(_run(0.5, 1, body, 64 * 1024, 0))
    assert result["requests"] > 0 and result["attack_requests"] > 0
