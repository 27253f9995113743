"""Versions: a broken one is never served, a failed load is retried, and requests for "the latest"
follow the latest even when their version goes away while they wait (gRPC and REST alike)."""

from __future__ import annotations

import json
import random
import shutil

import numpy as np
import pytest

from ray_app import rest_api
from ray_app.backends.embedded import EmbeddedBackend, retry_delay_s
from ray_app.config import AppConfig, LiveConfig
from ray_app.predictor import InferenceRequest, Predictor
from ray_app.protocol.status import NotFoundError
from ray_app.rest_routes import Route
from tests.conftest import publish_copy
from tests.polling import wait_for_async
from tests.unit.conftest import run_on_replica_loop
from tests.unit.static_backend import StaticBackend
from training.data import load_mnist

pytestmark = pytest.mark.usefixtures("replica_context")

IMAGES = load_mnist().test.images[:2]


def test_backoff_doubles_up_to_its_maximum() -> None:
    assert [retry_delay_s(n, 2.0, 30.0) for n in (1, 2, 3, 4, 5, 6)] == [2.0, 4.0, 8.0, 16.0, 30.0, 30.0]


def _corrupt(store, trained_export, version: int) -> None:
    """Publish ``version`` with a truncated saved_model.pb (as a crashed copy or a full disk leaves it)."""
    path = publish_copy(trained_export, store, version)
    graph = path / "saved_model.pb"
    graph.write_bytes(graph.read_bytes()[:200])


def _embedded(store, **config) -> tuple[Predictor, EmbeddedBackend]:
    app_config = AppConfig(
        model_base_path=str(store),
        poll_interval_s=0.2,
        load_retry_initial_s=0.5,
        load_retry_max_s=1.0,
        **config,
    )
    backend = EmbeddedBackend(app_config)
    predictor = Predictor(app_config, backend, rng=random.Random(0))
    predictor.reconfigure(LiveConfig())
    return predictor, backend


@pytest.mark.parametrize("published_while_serving", [True, False], ids=["while-serving", "before-start"])
def test_a_corrupt_version_is_never_served_and_is_retried_until_it_loads(
    store, trained_export, published_while_serving
) -> None:
    if not published_while_serving:
        _corrupt(store, trained_export, 2)

    async def scenario():
        predictor, backend = _embedded(store, num_versions=1)
        await backend.start()
        try:
            if published_while_serving:
                assert backend.versions() == [1]
                _corrupt(store, trained_export, 2)
            await wait_for_async(
                lambda: 2 in backend.version_states() and backend.version_states()[2].state == "END",
                30,
                "2 in backend.version_states() and backend.version_states()[2].state == 'END'",
            )
            states = backend.version_states()
            assert backend.versions() == [1] and states[2].state == "END"  # 1 keeps serving
            assert "saved_model.pb" in states[2].error or "Error" in states[2].error
            assert backend.health_problem() is None  # the replica stays healthy: it serves version 1
            answered = await predictor.predict(InferenceRequest("mnist", {"images": IMAGES}))
            assert answered.version == 1
            status = predictor.status("mnist", None)
            assert list(status) == [2, 1] and status[2].error
            # the cause goes away (the copy is repaired): the next retry loads it
            shutil.copy(trained_export / "saved_model.pb", store / "2" / "saved_model.pb")
            await wait_for_async(lambda: backend.versions() == [2], 15, "backend.versions() == [2]")
            assert backend.version_states()[2].error is None
            return (await predictor.predict(InferenceRequest("mnist", {"images": IMAGES}))).version
        finally:
            await backend.stop()

    assert run_on_replica_loop(scenario()) == 2


def test_a_store_with_only_broken_versions_is_unhealthy_and_says_why(tmp_path, trained_export) -> None:
    store = tmp_path / "mnist"
    _corrupt(store, trained_export, 1)

    async def scenario():
        predictor, backend = _embedded(store)
        await backend.start()
        try:
            problem = backend.health_problem()
            with pytest.raises(NotFoundError, match="no version could be loaded; the model status says why"):
                await predictor.predict(InferenceRequest("mnist", {"images": IMAGES}))
            return problem
        finally:
            await backend.stop()

    problem = run_on_replica_loop(scenario())
    assert problem.startswith("no version of 'mnist'") and "version 1:" in problem


@pytest.mark.parametrize("protocol", ["grpc", "rest"])
def test_an_unpinned_request_follows_the_latest_when_its_version_goes_while_it_waits(protocol) -> None:
    backend = StaticBackend(versions=(1,))
    predictor = Predictor(AppConfig(), backend)
    predictor.reconfigure(LiveConfig(max_batch_size=8, batch_wait_timeout_s=0.05))
    original_run = predictor.run

    async def run_after_a_rollout(target, inputs, output_filter=(), **options):
        backend._versions = [2]  # version 1 is unloaded between resolving and running
        return await original_run(target, inputs, output_filter, **options)

    predictor.run = run_after_a_rollout

    async def unpinned():
        if protocol == "rest":
            body = json.dumps({"instances": IMAGES.tolist()}).encode()
            return (await rest_api.predict(predictor, Route("predict", "mnist"), body))[1]
        return (await predictor.predict(InferenceRequest("mnist", {"images": IMAGES}))).version

    assert run_on_replica_loop(unpinned()) == 2
    backend._versions = [1]

    async def pinned():
        if protocol == "rest":
            body = json.dumps({"instances": IMAGES.tolist()}).encode()
            return await rest_api.predict(predictor, Route("predict", "mnist", 1), body)
        return await predictor.predict(InferenceRequest("mnist", {"images": IMAGES}, version=1))

    with pytest.raises(NotFoundError, match="version 1 was unloaded before the request ran"):
        run_on_replica_loop(pinned())


def test_deploying_before_the_first_version_waits_healthy_then_serves_it(tmp_path, trained_export) -> None:
    store = tmp_path / "mnist"

    async def scenario():
        predictor, backend = _embedded(store)
        await backend.start()
        try:
            assert backend.health_problem() is None
            with pytest.raises(NotFoundError, match="waiting for the first one to be published"):
                await predictor.predict(InferenceRequest("mnist", {"images": IMAGES}))
            publish_copy(trained_export, store, 1)
            await wait_for_async(lambda: backend.versions() == [1], 30, "backend.versions() == [1]")
            result = await predictor.predict(InferenceRequest("mnist", {"images": IMAGES}))
            return result.version, result.outputs["classes"]
        finally:
            await backend.stop()

    version, classes = run_on_replica_loop(scenario())
    assert version == 1 and np.asarray(classes).shape == (2,)
