"""Integration modules share a test process (pytest-xdist): one that leaves this process connected
to its Ray would make every later module's ``ray.init`` fail. It is disconnected here, and the
module that left it is named. Each module's cluster also holds the journey's ``ray stop`` off
(tests/ray_stop_lock.py)."""

import sys

import pytest

from tests import ray_stop_lock


@pytest.fixture(scope="module", autouse=True)
def _ray_stop_waits_for_this_module(request, tmp_path_factory):
    """Shared while the module runs (set up before its cluster, released after it is gone); the
    journey, which runs ``ray stop``, takes it exclusively for its clean-up."""
    if request.node.get_closest_marker("serial") or not request.node.get_closest_marker("integration"):
        yield
        return
    with ray_stop_lock.holding(ray_stop_lock.lock_path(tmp_path_factory), exclusive=False):
        yield


@pytest.fixture(scope="module", autouse=True)
def _ray_disconnected_after_the_module(request):
    yield
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
        pytest.fail(f"{request.module.__name__} left this process connected to a Ray cluster")
