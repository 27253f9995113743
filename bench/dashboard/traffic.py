"""Real gRPC and REST traffic of every kind the panels count, and a short real training run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np

from bench.dashboard.common import MODEL_NAME, PREDICT, REPO, RPC_TIMEOUT_S, stop_process

if TYPE_CHECKING:  # cluster.py builds its readiness probe from this module's requests
    from bench.dashboard.cluster import Cluster


def serialize(message: Any) -> bytes:
    return message.SerializeToString()


def raw(data: bytes) -> bytes:
    return data


def predict_request(images: np.ndarray, version: int | None = None, label: str | None = None) -> Any:
    from client.messages import ModelTarget, images_batch, predict_request

    return predict_request(ModelTarget(MODEL_NAME, version, label), images_batch(list(images)))


def _bad_shape_request(images: np.ndarray) -> Any:
    """A Predict whose ``images`` are 27x27: INVALID_ARGUMENT."""
    from ray_app.protocol.names import IMAGES_INPUT
    from ray_app.protocol.tensors import from_ndarray

    request = predict_request(images[:1])
    request.inputs[IMAGES_INPUT].CopyFrom(from_ndarray(np.zeros((1, 27, 27), np.uint8), tensor_content=True))
    return request


@dataclass(frozen=True)
class Kind:
    """One kind of request the traffic sends, and the status it should get."""

    name: str
    protocol: str  # grpc | rest
    expected: str  # gRPC status code name
    needs_labels: bool = False


KINDS = {
    k.name: k
    for k in (
        Kind("grpc latest", "grpc", "OK"),
        Kind("grpc pinned v1", "grpc", "OK"),
        Kind("grpc label canary", "grpc", "OK", needs_labels=True),
        Kind("grpc unknown version 99", "grpc", "NOT_FOUND"),
        Kind("grpc 27x27 images", "grpc", "INVALID_ARGUMENT"),
        Kind("grpc 1025 images", "grpc", "RESOURCE_EXHAUSTED"),
        Kind("rest latest", "rest", "OK"),
        Kind("rest pinned v1", "rest", "OK"),
        Kind("rest unknown version 99", "rest", "NOT_FOUND"),
        Kind("rest ragged instances", "rest", "INVALID_ARGUMENT"),
    )
}
GRPC_CYCLE = (
    "grpc latest", "grpc pinned v1", "grpc latest", "grpc unknown version 99", "grpc latest",
    "grpc label canary", "grpc latest", "grpc 27x27 images", "grpc latest", "grpc pinned v1",
    "grpc latest", "grpc 1025 images",
)  # fmt: skip
REST_CYCLE = ("rest latest", "rest pinned v1", "rest latest", "rest ragged instances", "rest latest",
              "rest unknown version 99")  # fmt: skip
_HTTP_TO_CODE = {400: "INVALID_ARGUMENT", 404: "NOT_FOUND", 429: "RESOURCE_EXHAUSTED", 503: "UNAVAILABLE"}


class Traffic:
    """Paced gRPC and REST workers; ``labels`` set once the canary labels are deployed."""

    def __init__(self, cluster: Cluster, rate_rps: float, images_per_request: int) -> None:
        from training.data import load_mnist

        test = load_mnist().test.images
        self.cluster = cluster
        self.labels = threading.Event()
        self.stop = threading.Event()
        self.outcomes: Counter[tuple[str, str]] = Counter()
        self._lock = threading.Lock()
        self._workers = 4  # 3 gRPC, 1 REST
        self._interval_s = self._workers / rate_rps
        k = images_per_request
        self._grpc = {
            "grpc latest": predict_request(test[:k]),
            "grpc pinned v1": predict_request(test[k : 2 * k], version=1),
            "grpc label canary": predict_request(test[2 * k : 3 * k], label="canary"),
            "grpc unknown version 99": predict_request(test[:k], version=99),
            "grpc 27x27 images": _bad_shape_request(test),
            "grpc 1025 images": predict_request(test[:1025]),
        }
        instances = test[:k].tolist()
        self._rest = {
            "rest latest": (f"/v1/models/{MODEL_NAME}:predict", {"instances": instances}),
            "rest pinned v1": (f"/v1/models/{MODEL_NAME}/versions/1:predict", {"instances": instances}),
            "rest unknown version 99": (
                f"/v1/models/{MODEL_NAME}/versions/99:predict",
                {"instances": instances},
            ),
            "rest ragged instances": (f"/v1/models/{MODEL_NAME}:predict", {"instances": [[1, 2, 3], [4]]}),
        }

    def _record(self, kind: str, code: str) -> None:
        with self._lock:
            self.outcomes[(kind, code)] += 1

    def _pick(self, cycle: tuple[str, ...], i: int) -> str:
        kind = cycle[i % len(cycle)]
        return "grpc latest" if KINDS[kind].needs_labels and not self.labels.is_set() else kind

    def _paced(self, offset: int, cycle: tuple[str, ...], send: Callable[[str], str]) -> None:
        next_s = time.monotonic() + offset * self._interval_s / self._workers
        i = offset
        while not self.stop.is_set():
            time.sleep(max(0.0, next_s - time.monotonic()))
            next_s += self._interval_s
            kind = self._pick(cycle, i)
            i += 1
            self._record(kind, send(kind))

    def _grpc_worker(self, offset: int) -> None:
        options = [("grpc.max_send_message_length", 16 * 1024 * 1024)]
        with grpc.insecure_channel(self.cluster.grpc_address, options=options) as channel:
            predict = channel.unary_unary(PREDICT, request_serializer=serialize, response_deserializer=raw)

            def send(kind: str) -> str:
                try:
                    predict(self._grpc[kind], timeout=RPC_TIMEOUT_S)
                    return "OK"
                except grpc.RpcError as exc:
                    return exc.code().name

            self._paced(offset, GRPC_CYCLE, send)

    def _rest_worker(self, offset: int) -> None:
        def send(kind: str) -> str:
            path, body = self._rest[kind]
            request = urllib.request.Request(
                self.cluster.http_url + path, data=json.dumps(body).encode(), method="POST",
                headers={"Content-Type": "application/json"},
            )  # fmt: skip
            try:  # urllib's timeout bounds each socket operation: enough for a local server
                with urllib.request.urlopen(request, timeout=RPC_TIMEOUT_S) as reply:
                    reply.read()
                return "OK"
            except urllib.error.HTTPError as exc:
                return _HTTP_TO_CODE.get(exc.code, f"HTTP {exc.code}")
            except OSError as exc:
                return f"no answer ({type(exc).__name__})"

        self._paced(offset, REST_CYCLE, send)

    def run(
        self, duration_s: float, events: list[tuple[float, str, Callable[[], None]]]
    ) -> list[dict[str, Any]]:
        """Send traffic for ``duration_s``; run each event ``(at_s, name, action)`` on time. Returns
        the events with their wall-clock times."""
        threads = [threading.Thread(target=self._grpc_worker, args=(i,), daemon=True) for i in range(3)]
        threads.append(threading.Thread(target=self._rest_worker, args=(3,), daemon=True))
        started = time.monotonic()
        for thread in threads:
            thread.start()
        done = []
        try:
            for at_s, name, action in sorted(events, key=lambda e: e[0]):
                time.sleep(max(0.0, started + at_s - time.monotonic()))
                print(f"  t={time.monotonic() - started:5.1f}s  {name}", flush=True)
                done.append({"name": name, "time": time.time()})
                action()
            time.sleep(max(0.0, started + duration_s - time.monotonic()))
        finally:
            self.stop.set()
            for thread in threads:
                thread.join(timeout=RPC_TIMEOUT_S + 5)
        return done


def run_training(cluster: Cluster, workdir: Path, timeout_s: float) -> tuple[bool, str]:
    """``training/train.py --smoke-test --epochs 1`` on our Ray (its own throwaway store)."""
    log = workdir / "training.log"
    cmd = [
        sys.executable, str(REPO / "training" / "train.py"), "--smoke-test", "--epochs", "1",
        "--model_path", str(workdir / "train-store" / MODEL_NAME),
        "--storage-path", str(workdir / "train-runs"), "--max-failures", "0",
    ]  # fmt: skip
    env = {**os.environ, "RAY_ADDRESS": cluster.gcs_address}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        stop_process(proc)
        return False, f"stopped after {timeout_s:.0f} s (log {log})"
    finally:
        stop_process(proc)
    tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
    return proc.returncode == 0, f"exit {proc.returncode}: {tail[0][:200]}"
