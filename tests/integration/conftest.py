"""Integration modules share a test process (pytest-xdist): one that leaves this process connected
to its Ray would make every later module's ``ray.init`` fail. It is disconnected here, and the
module that left it is named."""

import sys

import pytest


@pytest.fixture(scope="module", autouse=True)
def _ray_disconnected_after_the_module(request):
    yield
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
        pytest.fail(f"{request.module.__name__} left this process connected to a Ray cluster")
