"""CPU work on request content above a small size runs off the event loop (issue 15 item 4): with
RAY_SERVE_THROUGHPUT_OPTIMIZED=1 that loop is also Serve's gRPC/HTTP servers' and health checks'."""

from __future__ import annotations

import asyncio
import json
import os
import pickle
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from ray_app import grpc_api, json_tensor, oip_rest, rest_api, rest_routes
from ray_app.config import AppConfig, LiveConfig
from ray_app.offload import Offloader
from ray_app.predictor import Predictor
from ray_app.protocol import oip_tensors, tensors
from ray_app.protocol.protos import meta_graph_pb2, predict_pb2
from ray_app.protocol.status import ResourceExhaustedError, ServingError
from ray_app.protocol.tensors import from_ndarray
from ray_app.signatures import SignatureSpec, TensorSpec
from tests.unit.conftest import ArrivedBody, run_on_replica_loop
from tests.unit.static_backend import StaticBackend

pytestmark = pytest.mark.usefixtures("replica_context")


def _predictor(**limits) -> Predictor:
    """Bodies of 64 KiB and more on the threads; no decoding processes unless ``limits`` ask."""
    limits = {"offload_min_bytes": 64 * 1024, "offload_processes": 0, **limits}
    predictor = Predictor(AppConfig(limits=limits), StaticBackend(), rng=random.Random(0))
    predictor.reconfigure(LiveConfig())
    return predictor


def _spy(monkeypatch, module, name: str) -> list[str]:
    threads: list[str] = []
    original = getattr(module, name)

    def spied(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, spied)
    return threads


@pytest.mark.parametrize("images", [1, 64])  # ~2.4 kB (inline) and ~150 kB (offloaded)
def test_rest_bodies_are_parsed_and_converted_off_the_loop_unless_small(monkeypatch, images: int) -> None:
    parsed, converted = _spy(monkeypatch, json_tensor, "parse"), _spy(monkeypatch, json_tensor, "to_tensor")
    body = json.dumps({"instances": np.zeros((images, 28, 28), int).tolist()}).encode()
    text, _, _ = run_on_replica_loop(
        rest_api.predict(_predictor(), rest_routes.Route("predict", "mnist"), body)
    )
    assert len(json.loads(text)["predictions"]) == images
    loop_thread = threading.current_thread().name
    expected = loop_thread if len(body) < 64 * 1024 else "offload"
    assert [name.split("_")[0] for name in parsed + converted] == [expected, expected]


@pytest.mark.parametrize("images", [1, 128])  # ~0.8 kB (inline) and ~100 kB (offloaded)
def test_grpc_messages_are_decoded_off_the_loop_unless_small(monkeypatch, images: int) -> None:
    decoded = _spy(monkeypatch, tensors, "to_ndarray")
    monkeypatch.setattr(grpc_api, "to_ndarray", tensors.to_ndarray)
    request = predict_pb2.PredictRequest(
        model_spec={"name": "mnist"}, inputs={"images": from_ndarray(np.zeros((images, 28, 28), np.uint8))}
    )
    raw = request.SerializeToString()
    response = run_on_replica_loop(grpc_api.predict(_predictor(), raw))
    assert list(response.outputs["classes"].tensor_shape.dim)[0].size == images
    expected = threading.current_thread().name if len(raw) < 64 * 1024 else "offload"
    assert [name.split("_")[0] for name in decoded] == [expected]


# -- decoding processes: large REST bodies decoded where their parse cannot hold our GIL --------
def _crash() -> None:
    os.kill(os.getpid(), signal.SIGKILL)  # as the kernel's OOM killer would


def test_large_bodies_run_in_a_process_of_lowest_priority_and_small_ones_here() -> None:
    offloader = Offloader(threads=1, min_bytes=1024, processes=1, process_min_bytes=1 << 20)
    try:

        async def three():
            return await asyncio.gather(
                offloader.run_isolated(10, os.getpid),
                offloader.run_isolated(1 << 19, threading.current_thread),
                offloader.run_isolated(1 << 20, os.getpid),
            )

        here, thread, child = run_on_replica_loop(three())
        assert here == os.getpid() and thread.name.startswith("offload")
        assert child != os.getpid() and psutil.Process(child).ppid() == os.getpid()
        assert psutil.Process(child).nice() == 19
        assert os.sched_getscheduler(child) == os.SCHED_IDLE  # below every nice level
    finally:
        offloader.close()


def _ends(pid: int, timeout_s: float) -> bool:
    """Whether process ``pid`` is gone (or a zombie) within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


def test_a_decoding_process_that_dies_fails_only_its_request_and_is_replaced() -> None:
    offloader = Offloader(threads=1, min_bytes=0, processes=1, process_min_bytes=0)
    try:
        first = run_on_replica_loop(offloader.run_isolated(1, os.getpid))
        with pytest.raises(ResourceExhaustedError, match="decoding process ended"):
            run_on_replica_loop(offloader.run_isolated(1, _crash))
        second = run_on_replica_loop(offloader.run_isolated(1, os.getpid))
        assert second != first and offloader.processes_replaced == 1
        assert _ends(first, timeout_s=10)  # its exit runs at the lowest priority too
    finally:
        offloader.close()


def test_decoding_processes_end_with_a_replica_killed_by_sigkill(tmp_path) -> None:
    script = (
        "import asyncio, os, sys, time\n"
        "from ray_app.offload import Offloader\n"
        "if __name__ == '__main__':\n"
        "    o = Offloader(1, 0, processes=1, process_min_bytes=0)\n"
        "    print(asyncio.run(o.run_isolated(1, os.getpid)), flush=True)\n"
        "    time.sleep(60)\n"
    )
    (tmp_path / "replica.py").write_text(script)
    replica = subprocess.Popen(
        [sys.executable, str(tmp_path / "replica.py")], stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])},
    )  # fmt: skip
    try:
        child = int(replica.stdout.readline())
        started = psutil.Process(replica.pid).children(recursive=True)  # with multiprocessing's tracker
        assert child in [process.pid for process in started]
        replica.kill()
        replica.wait(timeout=10)
        _, alive = psutil.wait_procs(started, timeout=10)
        assert not alive  # none outlived the replica
    finally:
        replica.kill()
        replica.stdout.close()


@pytest.mark.parametrize(
    "body",
    [
        json.dumps({"instances": np.arange(200 * 784).reshape(200, 28, 28).tolist()}).encode(),
        json.dumps({"instances": [[0.5] * 784] * 199 + [[0.5] * 783 + [None]]}).encode(),
        json.dumps({"signature_name": "nope", "instances": [[0.5] * 784] * 200}).encode(),
        b'{"instances": [' + b"0," * 200_000 + b'"a"]}',
    ],
    ids=["answered", "a null", "unknown signature", "more rows than allowed"],
)
def test_a_body_decoded_in_a_process_gets_the_same_answer_as_here(body: bytes) -> None:
    """The decoding process changes where a body is decoded, not what it is answered: the same
    predictions, or the same error (status, limit and TF Serving's text)."""
    assert len(body) > 256 * 1024
    answers = []
    for processes in (0, 1):
        predictor = _predictor(offload_processes=processes, offload_process_min_bytes=256 * 1024)
        try:
            answers.append(
                run_on_replica_loop(rest_api.predict(predictor, rest_routes.Route("predict", "mnist"), body))
            )
        except ServingError as exc:
            answers.append((type(exc), exc.message, getattr(exc, "limit", None)))
        finally:
            predictor.close()
    assert answers[0] == answers[1]


def _v2_infer(images: int, **changes) -> bytes:
    item = {"name": "images", "datatype": "UINT8", "shape": [images, 28, 28], "data": [7] * (images * 784)}
    return json.dumps({"inputs": [{**item, **changes}]}).encode()


def _v2_answer(predictor: Predictor, body: bytes) -> tuple[int, bytes]:
    headers = {"content-length": str(len(body))}
    answer = run_on_replica_loop(
        oip_rest.handle(predictor, "POST", "/v2/models/mnist/infer", headers, ArrivedBody(body))
    )
    return answer.status, answer.body


@pytest.mark.parametrize("images", [1, 64])  # ~3 kB (inline) and ~150 kB (offloaded)
def test_open_inference_protocol_json_is_decoded_off_the_loop_unless_small(monkeypatch, images: int) -> None:
    decoded = _spy(monkeypatch, oip_tensors, "from_json")
    body = _v2_infer(images)
    status, answer = _v2_answer(_predictor(), body)
    assert status == 200, answer
    assert json.loads(answer)["outputs"][0]["shape"][0] == images
    expected = threading.current_thread().name if len(body) < 64 * 1024 else "offload"
    assert [name.split("_")[0] for name in decoded] == [expected]


@pytest.mark.parametrize(
    "body",
    [
        _v2_infer(200),
        _v2_infer(200, data=[0.5] * (200 * 784 - 1) + [None]),
        _v2_infer(200, datatype="FP32"),
        _v2_infer(2000, data=[0] * 200_000),
    ],
    ids=["answered", "a null", "another datatype", "more images than allowed"],
)
def test_an_open_inference_protocol_body_decoded_in_a_process_gets_the_same_answer(monkeypatch, body) -> None:
    """/v2 JSON as TF Serving's REST bodies: decoded in the decoding process when large (never
    here), with the same answer, or the same error (status and Triton's text)."""
    assert len(body) > 256 * 1024
    decoded_here, answers = _spy(monkeypatch, oip_tensors, "from_json"), []
    for processes in (0, 1):
        predictor = _predictor(offload_processes=processes, offload_process_min_bytes=256 * 1024)
        calls_before = len(decoded_here)
        try:
            answers.append(_v2_answer(predictor, body))
        finally:
            predictor.close()
    assert len(decoded_here) == calls_before  # the decoding process's run decoded nothing here
    assert answers[0] == answers[1]


def test_the_signatures_sent_to_a_decoding_process_carry_no_signature_def() -> None:
    """A replica's SignatureDefs are TensorFlow's classes: unpickled in the decoding process they
    would import TensorFlow there (measured: 2.5 s and ~600 MiB on its first body)."""
    signature_def = meta_graph_pb2.SignatureDef(method_name="tensorflow/serving/predict")
    signature_def.inputs["images"].CopyFrom(TensorSpec.of(np.uint8, (None, 28, 28), "x:0").tensor_info())
    spec = SignatureSpec.from_signature_def(signature_def)
    sent = pickle.dumps(spec.for_decoding())
    assert b"meta_graph_pb2" not in sent and b"SignatureDef" not in sent
    assert pickle.loads(sent) == spec and spec.signature_def is signature_def
