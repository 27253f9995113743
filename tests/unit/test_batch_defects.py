"""Three defects of issue 15 item 6: lowering max_batch_size live while a larger item is queued,
a batch whose items do not concatenate, and version 0 (TF Serving serves a 0/ directory as
version 0: ``ServerCore::ServableRequestFromModelSpec`` makes any set version ``Specific``)."""

from __future__ import annotations

import asyncio
import random

import numpy as np
import pytest

from ray_app.config import AppConfig, LiveConfig
from ray_app.predictor import InferenceRequest, Predictor
from ray_app.protocol.names import IMAGES_INPUT
from ray_app.protocol.status import NotFoundError
from ray_app.signatures import SignatureSpec, TensorSpec
from tests.unit import static_backend
from tests.unit.conftest import run_on_replica_loop
from tests.unit.static_backend import StaticBackend

pytestmark = pytest.mark.usefixtures("replica_context")


class _GatedBackend(StaticBackend):
    """Calls wait for a gate (a busy model); the images input takes any image size."""

    def __init__(self, versions=(1,)) -> None:
        super().__init__(versions=versions)
        self.gate = asyncio.Event()
        self.started = 0

    def signatures(self, version):
        specs = dict(static_backend.SPECS)
        default = specs["serving_default"]
        specs["serving_default"] = SignatureSpec(
            inputs={IMAGES_INPUT: TensorSpec.of(np.uint8, (None, None, None), "images:0")},
            outputs=default.outputs,
        )
        return specs

    async def predict(self, version, signature, inputs, output_filter, **options):
        self.started += 1
        await self.gate.wait()
        return await super().predict(version, signature, inputs, output_filter)


def _images(count: int, size: int = 28) -> InferenceRequest:
    return InferenceRequest("mnist", {"images": np.zeros((count, size, size), np.uint8)})


async def _behind_a_busy_model(predictor, backend, requests, between=None):
    """Occupy the model (a lone request) and the batch handler (a batched one), queue ``requests``,
    run ``between``, then let the model go."""
    busy = [asyncio.ensure_future(predictor.predict(_images(1)))]
    while backend.started < 1:
        await asyncio.sleep(0)
    busy.append(asyncio.ensure_future(predictor.predict(_images(1))))
    while backend.started < 2:
        await asyncio.sleep(0)
    queued = [asyncio.ensure_future(predictor.predict(r)) for r in requests]
    await asyncio.sleep(0.05)
    if between is not None:
        between()
    backend.gate.set()
    return await asyncio.gather(*busy, *queued, return_exceptions=True)


def test_lowering_max_batch_size_under_a_queued_larger_item_still_answers_it() -> None:
    backend = _GatedBackend()
    predictor = Predictor(AppConfig(), backend, rng=random.Random(0))
    predictor.reconfigure(LiveConfig(max_batch_size=32, batch_wait_timeout_s=0.0))

    async def main():
        busy = asyncio.ensure_future(predictor.predict(_images(1)))  # in flight: the next one batches
        while backend.started < 1:
            await asyncio.sleep(0)
        large = asyncio.ensure_future(predictor.predict(_images(20)))
        await asyncio.sleep(0)  # it is in Serve's queue; Serve's batch loop has not taken it yet
        predictor.reconfigure(LiveConfig(max_batch_size=8, batch_wait_timeout_s=0.0))  # `serve deploy`
        backend.gate.set()
        return await asyncio.gather(busy, large, return_exceptions=True)

    busy, large = run_on_replica_loop(main())
    assert not isinstance(large, Exception), repr(large)  # was Serve's RuntimeError (INTERNAL)
    assert len(large.outputs["classes"]) == 20 and len(busy.outputs["classes"]) == 1


def test_items_that_do_not_concatenate_never_share_a_backend_call() -> None:
    backend = _GatedBackend()
    predictor = Predictor(AppConfig(), backend, rng=random.Random(0))
    predictor.reconfigure(LiveConfig(max_batch_size=32, batch_wait_timeout_s=0.05))
    requests = [_images(2, 28), _images(3, 20), _images(1, 28)]
    outcomes = run_on_replica_loop(_behind_a_busy_model(predictor, backend, requests))
    assert not [o for o in outcomes if isinstance(o, Exception)], outcomes  # one shape failed them all
    assert [len(o.outputs["classes"]) for o in outcomes[2:]] == [2, 3, 1]
    assert sorted(size for _, _, size in backend.calls[2:]) == [3, 3]  # 28x28 items together, 20x20 apart


@pytest.mark.parametrize(("versions", "answer"), [((0, 1), 0), ((1, 2), None)])
def test_version_0_is_a_specific_version(versions, answer) -> None:
    predictor = Predictor(AppConfig(), StaticBackend(versions=versions), rng=random.Random(0))
    predictor.reconfigure(LiveConfig())
    request = InferenceRequest("mnist", {"images": np.zeros((1, 28, 28), np.uint8)}, version=0)
    if answer is None:
        with pytest.raises(NotFoundError, match=r"Specific\(mnist, 0\)"):
            run_on_replica_loop(predictor.predict(request))
    else:
        assert run_on_replica_loop(predictor.predict(request)).version == answer
