"""Unit tests never start Ray: any attempt fails loudly."""

import asyncio

import pytest

# Ray Serve keeps one batch queue per decorated method (not per instance), bound to the event loop
# of its first call; as in a replica, every unit test that runs the predictor uses this one loop.
REPLICA_LOOP = asyncio.new_event_loop()


def run_on_replica_loop(coroutine):
    return REPLICA_LOOP.run_until_complete(coroutine)


@pytest.fixture(autouse=True)
def _no_ray(monkeypatch):
    import ray

    def refuse(*args, **kwargs):
        raise AssertionError("unit tests must not start Ray (ray.init was called)")

    monkeypatch.setattr(ray, "init", refuse)


@pytest.fixture
def replica_context(monkeypatch):
    """Lets Ray Serve's real ``@serve.batch`` run outside a replica (it asks for the replica's config)."""
    from types import SimpleNamespace

    from ray import serve

    context = SimpleNamespace(_deployment_config=SimpleNamespace(max_ongoing_requests=1024))
    monkeypatch.setattr(serve, "get_replica_context", lambda: context)
    return context


class ArrivedBody:
    """An HTTP body that has fully arrived, as Starlette's ``request.stream()`` yields it: one
    chunk. Remembers whether anything read it."""

    def __init__(self, body: bytes) -> None:
        self.body, self.read = body, False

    async def __aiter__(self):
        self.read = True
        yield self.body
