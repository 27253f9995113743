"""Issue 15's attack table through the front door: each attack beside a normal client.

``serve run`` of serve_configs/local.yaml (2 replicas) behind Ray's HAProxy as the README starts
it (bench.run_all's ``ray-haproxy`` variant), optionally behind the edge too (``ray-haproxy-edge``).
A normal client sends 1-image gRPC Predicts one after another (5 s deadline) for the whole run;
each attack is sent ``--repeat`` times, one after another, and for each we record the answer, how
long it took, how much the replicas' RSS grew over what it was just before (sampled every 20 ms,
the most any replica grew), and the normal client's p50/p99 over the requests it started while
the attack ran. The same client alone, before the attacks and after them, is the baseline and
the health check.

    .venv/bin/python -m bench.attack_table --model-base-path /tmp/store \\
        --out bench/results/attack-table.json [--variants ray-haproxy ray-haproxy-edge]
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import socket
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import psutil

ATTACK_BYTES = 7 * 1024 * 1024
CONCURRENT_BODIES = 16
SLOW_CONNECTIONS = 300
SLOW_HOLD_S = 3.0
SLOW_UPLOADS = 16  # 8 per replica: 64 MiB declared against a budget of 32 MiB each
SLOW_UPLOAD_DECLARED_BYTES = 8 * 1024 * 1024  # local.yaml's max_request_bytes
SLOW_UPLOAD_SENT_BYTES = 1024
SAMPLE_EVERY_S = 0.02
QUIET_S = 5.0
_PREDICT = "/tensorflow.serving.PredictionService/Predict"
_REST_PATH = "/v1/models/mnist:predict"


# -- the attacks' payloads ---------------------------------------------------------------------
def _fill(prefix: bytes, item: bytes, suffix: bytes, size: int = ATTACK_BYTES) -> bytes:
    """``prefix`` + ``item`` repeated to about ``size`` bytes + ``suffix``."""
    count = (size - len(prefix) - len(suffix)) // len(item)
    return prefix + item * count + suffix


def rest_bodies() -> dict[str, bytes]:
    """The REST rows of issue 15's table, each about 7 MiB (the 100,000-key one is smaller)."""
    keys = b",".join(b'"k%d": 0' % i for i in range(100_000))
    return {
        'REST {"instances": [0,0,...,0,"a"]}, 7 MiB': _fill(b'{"instances": [', b"0,", b'"a"]}'),
        "REST 2M one-element rows [[0],[0],...], 7 MiB": _fill(b'{"instances": [', b"[0],", b"[0]]}"),
        "REST floats ending in null, 7 MiB": _fill(b'{"instances": [', b"0.5,", b"null]}"),
        "REST missing comma at the very end, 7 MiB": _fill(b'{"instances": [', b"0,", b"0 0]}"),
        "REST inputs object with 100,000 keys": b'{"inputs": {' + keys + b"}}",
    }


def largest_valid_body(images: int = 1024, value_bytes: int = 10) -> bytes:
    """A body the server must answer in full: ``images`` uint8 28x28 digits (local.yaml's
    ``max_images_per_request``), each value written as ``255`` padded with spaces to
    ``value_bytes`` with its comma, so the body comes near ``max_request_bytes`` (8 MiB) while its
    lists stay under ``max_json_composites``: the most a valid REST request can make a replica
    parse, hold and run."""
    value = b"255" + b" " * (value_bytes - 4)
    row = b"[" + b",".join([value] * 28) + b"]"
    image = b"[" + b",".join([row] * 28) + b"]"
    return b'{"instances": [' + b",".join([image] * images) + b"]}"


def grpc_int_val_request(count: int = 7_000_000) -> bytes:
    """A Predict whose uint8 ``[1,28,28]`` input carries ``count`` ``int_val`` varints (~7 MB)."""
    from ray_app.protocol.protos import predict_pb2, types_pb2

    request = predict_pb2.PredictRequest()
    request.model_spec.name = "mnist"
    tensor = request.inputs["images"]
    tensor.dtype = types_pb2.DT_UINT8
    for size in (1, 28, 28):
        tensor.tensor_shape.dim.add(size=size)
    tensor.int_val.extend([1] * count)
    return request.SerializeToString()


def _post(port: int, body: bytes, timeout_s: float = 30.0) -> str:
    """POST ``body`` to the REST predict path; the answer as ``status: start of the message``."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
    try:
        connection.request("POST", _REST_PATH, body=body, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        text = response.read(300).decode(errors="replace")
        return f"{response.status}: {text[:120]}"
    except (OSError, http.client.HTTPException) as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        connection.close()


def _grpc_raw(channel: grpc.Channel, payload: bytes, timeout_s: float = 30.0) -> str:
    call = channel.unary_unary(_PREDICT, request_serializer=None, response_deserializer=None)
    try:
        call(payload, timeout=timeout_s)
        return "OK"
    except grpc.RpcError as exc:
        return f"{exc.code().name}: {(exc.details() or '')[:120]}"


# -- what is measured beside each attack ---------------------------------------------------------
def _rss(process: psutil.Process) -> int:
    try:
        return process.memory_info().rss
    except psutil.Error:  # ended meanwhile
        return 0


class ReplicaMemory:
    """Samples the RSS of the given replica processes (each with its children) every 20 ms, in a
    thread."""

    def __init__(self, pids: list[int]) -> None:
        self._processes = [psutil.Process(pid) for pid in pids]
        if not self._processes:
            raise RuntimeError("no Serve replica process found")
        self._peak: dict[int, int] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="rss", daemon=True)

    def rss(self) -> dict[int, int]:
        """Each replica's RSS with its children's (its decoding process: ``ray_app.offload``)."""
        now = {}
        for process in self._processes:
            with contextlib.suppress(psutil.Error):
                tree = [process, *process.children(recursive=True)]
                now[process.pid] = sum(_rss(member) for member in tree)
        return now

    def _sample(self) -> None:
        while not self._stop.wait(SAMPLE_EVERY_S):
            now = self.rss()
            with self._lock:
                for pid, rss in now.items():
                    self._peak[pid] = max(self._peak.get(pid, 0), rss)

    @contextlib.contextmanager
    def growth(self) -> Iterator[dict[str, float]]:
        """Yields a dict that holds, once the block is over, the most any replica's RSS rose above
        what it was at the start (MiB), and the replicas' RSS after (MiB)."""
        before = self.rss()
        with self._lock:
            self._peak = dict(before)
        result: dict[str, float] = {}
        yield result
        with self._lock:
            peak = dict(self._peak)
        result["rss_growth_mib"] = round(max(peak[pid] - before[pid] for pid in before) / 2**20, 1)
        result["rss_after_mib"] = round(sum(self.rss().values()) / 2**20, 1)

    def __enter__(self) -> ReplicaMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


@dataclass
class _Sample:
    started: float
    latency_s: float | None  # None: failed
    code: str = "OK"


class NormalClient:
    """1-image gRPC Predicts one after another in a thread, each timestamped, for the whole run."""

    def __init__(self, channel: grpc.Channel, request: bytes, timeout_s: float = 5.0) -> None:
        self._call = channel.unary_unary(_PREDICT, request_serializer=None, response_deserializer=None)
        self._request, self._timeout_s = request, timeout_s
        self.samples: list[_Sample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="normal-client", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self._call(self._request, timeout=self._timeout_s)
                self.samples.append(_Sample(started, time.monotonic() - started))
            except grpc.RpcError as exc:
                self.samples.append(_Sample(started, None, exc.code().name))

    def between(self, start: float, end: float) -> dict[str, Any]:
        """p50/p99 and failures of the requests started in [start, end]."""
        window = [s for s in list(self.samples) if start <= s.started <= end]
        latencies = [s.latency_s for s in window if s.latency_s is not None]
        failed: dict[str, int] = {}
        for sample in window:
            if sample.latency_s is None:
                failed[sample.code] = failed.get(sample.code, 0) + 1

        def pct(q: float) -> float | None:
            return round(float(np.percentile(latencies, q)) * 1000, 1) if latencies else None

        return {"requests": len(window), "failed": failed, "p50_ms": pct(50), "p99_ms": pct(99)}

    def __enter__(self) -> NormalClient:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=self._timeout_s + 5)


# -- the table -----------------------------------------------------------------------------------
def _concurrently(send: Callable[[], str], count: int = CONCURRENT_BODIES) -> str:
    """``send`` from ``count`` threads at once; how many got each answer."""
    answers: list[str] = []
    threads = [threading.Thread(target=lambda: answers.append(send())) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return ", ".join(f"{answers.count(a)}x {a}" for a in sorted(set(answers)))


def attacks(http_port: int, channel: grpc.Channel) -> dict[str, Callable[[], str]]:
    """Each request attack of the table as a callable that sends it once and returns its answer
    (the slow connections are ``slow_connections``)."""
    table: dict[str, Callable[[], str]] = {}
    bodies = rest_bodies()
    for name, body in bodies.items():
        table[name] = lambda body=body: _post(http_port, body)
    int_val = grpc_int_val_request()
    table[INT_VAL_NAME] = lambda: _grpc_raw(channel, int_val)
    first = next(iter(bodies.values()))

    def concurrent() -> str:
        return _concurrently(lambda: _post(http_port, first).split(":")[0])

    table[CONCURRENT_NAME] = concurrent
    largest = largest_valid_body()

    def concurrent_valid() -> str:
        return _concurrently(lambda: _post(http_port, largest, timeout_s=60.0).split(":")[0])

    table[CONCURRENT_VALID_NAME] = concurrent_valid
    table[SLOW_UPLOADS_NAME] = lambda: slow_uploads(http_port)
    return table


def slow_uploads(http_port: int) -> str:
    """Connections that each declare the largest body and send 1 KiB of it, held open: if the
    declared lengths took the in-flight budget, every other request would be refused meanwhile."""
    head = (
        b"POST " + _REST_PATH.encode() + b" HTTP/1.1\r\nHost: attack\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % SLOW_UPLOAD_DECLARED_BYTES
    )
    start = b'{"instances": ['
    part = start + b"0," * ((SLOW_UPLOAD_SENT_BYTES - len(start)) // 2)
    held = []
    try:
        for _ in range(SLOW_UPLOADS):
            sock = socket.create_connection(("127.0.0.1", http_port), timeout=5)
            held.append(sock)
            sock.sendall(head + part)
        time.sleep(SLOW_HOLD_S)
        answered = 0
        for sock in held:
            sock.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                answered += bool(sock.recv(1))  # an early answer (or b"": closed)
        return f"held {SLOW_HOLD_S:g} s; {answered} answered early"
    finally:
        for sock in held:
            sock.close()


INT_VAL_NAME = "gRPC uint8 input sent as 7M int_val varints"
CONCURRENT_NAME = f"{CONCURRENT_BODIES} concurrent REST bodies of 7 MiB (the first kind)"
CONCURRENT_VALID_NAME = (
    f"{CONCURRENT_BODIES} concurrent valid REST bodies of 7.7 MiB (1,024 images each: the most allowed)"
)
SLOW_NAME = f"{SLOW_CONNECTIONS} HTTP connections sending headers and 1 byte of a 1,000-byte body"
SLOW_UPLOADS_NAME = (
    f"{SLOW_UPLOADS} HTTP uploads declaring 8 MiB, sending 1 KiB of it, held {SLOW_HOLD_S:g} s"
)


def slow_connections(http_port: int) -> str:
    from bench.slow_clients import Target, attack_in_another_process

    target = Target("127.0.0.1", http_port)
    with attack_in_another_process(target, SLOW_CONNECTIONS, "http", SLOW_HOLD_S) as counters:
        time.sleep(SLOW_HOLD_S + 0.5)
    return f"held {SLOW_HOLD_S:g} s; {json.dumps(counters)}"


# The attacker's process: one per run, the table built once in it.
_ATTACKS: dict[str, Callable[[], str]] = {}


def _start_attacker(http_port: int, grpc_target: str, nice: int = 0) -> None:
    if nice:
        os.nice(nice)
    channel = grpc.insecure_channel(grpc_target, options=[("grpc.max_send_message_length", -1)])
    _ATTACKS.update(attacks(http_port, channel))


def _send_attack(name: str) -> tuple[str, float, float]:
    start = time.monotonic()  # CLOCK_MONOTONIC: the same clock in every process of the machine
    answer = _ATTACKS[name]()
    return answer, start, time.monotonic()


class Attacker:
    """The attacks, sent from a process of their own. An attacker is another client (another
    machine): in the measuring process, its threads would take the normal client's GIL, and their
    Python time would read as the server's. It still shares this machine's cores; ``nice`` (a
    diagnostic, not the table's way) lowers its priority, to see how much of what the normal
    client feels is the attacker's own CPU, which another machine would pay."""

    def __init__(self, http_port: int, grpc_target: str, nice: int = 0) -> None:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        self._pool = ProcessPoolExecutor(
            max_workers=1,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_start_attacker,
            initargs=(http_port, grpc_target, nice),
        )
        self.http_port = http_port

    def send(self, name: str) -> tuple[str, float, float]:
        """Sends one attack; its answer, and when it started and ended (time.monotonic)."""
        if name == SLOW_NAME:
            start = time.monotonic()
            return slow_connections(self.http_port), start, time.monotonic()
        return self._pool.submit(_send_attack, name).result(timeout=600)

    def __enter__(self) -> Attacker:
        self._pool.submit(time.monotonic).result(timeout=120)  # started, its payloads built
        return self

    def __exit__(self, *exc: object) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def attack_names() -> list[str]:
    """The table's rows, in its order."""
    bodies = list(rest_bodies())
    return [*bodies, INT_VAL_NAME, CONCURRENT_NAME, CONCURRENT_VALID_NAME, SLOW_UPLOADS_NAME, SLOW_NAME]


def measure(
    grpc_target: str,
    http_port: int,
    replica_pids: list[int],
    repeat: int,
    only: str | None = None,
    attacker_nice: int = 0,
) -> dict:
    from bench.loadgen import build_requests

    request = build_requests("mnist", 1, count=1)[0][0].SerializeToString()
    names = [name for name in attack_names() if only is None or only.lower() in name.lower()]
    results: dict[str, Any] = {}
    with (
        Attacker(http_port, grpc_target, attacker_nice) as attacker,
        grpc.insecure_channel(grpc_target) as channel,
        ReplicaMemory(replica_pids) as memory,
        NormalClient(channel, request) as normal,
    ):
        time.sleep(2.0)  # warm-up
        start = time.monotonic()
        time.sleep(QUIET_S)
        results["none (the normal client alone)"] = {"normal": normal.between(start, time.monotonic())}
        for name in names:
            runs = []
            for _ in range(repeat):
                with memory.growth() as grown:
                    answer, start, end = attacker.send(name)
                runs.append({"answer": answer, "time_s": round(end - start, 2), **grown,
                             "normal": normal.between(start, end)})  # fmt: skip
                time.sleep(1.0)
            results[name] = _summary(runs)
            print(f"  {name}: {results[name]['summary']}", flush=True)
        start = time.monotonic()
        time.sleep(QUIET_S)
        results["none, after the attacks"] = {"normal": normal.between(start, time.monotonic())}
    return results


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    p99s = [r["normal"]["p99_ms"] for r in runs if r["normal"]["p99_ms"] is not None]
    failed = sum(sum(r["normal"]["failed"].values()) for r in runs)
    return {
        "runs": runs,
        "summary": {
            "answers": sorted({r["answer"][:60] for r in runs}),
            "time_s_median": statistics.median(r["time_s"] for r in runs),
            "rss_growth_mib_max": max(r["rss_growth_mib"] for r in runs),
            "normal_p99_ms_median": statistics.median(p99s) if p99s else None,
            "normal_p99_ms_max": max(p99s) if p99s else None,
            "normal_failed": failed,
        },
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model-base-path",
        required=True,
        type=Path,
        help="MODEL_BASE_PATH: the app serves MODEL_BASE_PATH/MODEL_NAME",
    )
    parser.add_argument("--model-name", default="mnist")
    parser.add_argument("--variants", nargs="+", default=["ray-haproxy", "ray-haproxy-edge"])
    parser.add_argument("--repeat", type=int, default=3, help="times each attack is sent")
    parser.add_argument("--only", default=None, help="only the attacks whose name holds this text")
    parser.add_argument(
        "--attacker-nice",
        type=int,
        default=0,
        help="diagnostic: the attacker's process at this nice increment (0: the table's way)",
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    from bench.processes import replica_pids
    from bench.servers import serve_app
    from bench.variants import VARIANTS

    app_args = argparse.Namespace(
        model_name=args.model_name,
        model_base_path=args.model_base_path.resolve(),
        ready_timeout_s=240.0,
        keep_ray_tmp=False,
    )
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "repeat": args.repeat,
        "attacker_nice": args.attacker_nice,
        "variants": {},
    }
    for name in args.variants:
        print(f"{name}:", flush=True)
        workdir = Path(tempfile.mkdtemp(prefix="attack-table-"))
        with serve_app(VARIANTS[name], app_args, workdir) as running:
            http_port = running.notes["http_port"]
            if running.edge_pids is not None:  # the edge's own HTTP port is where clients go
                http_port = running.notes["edge_http_port"]
            results["variants"][name] = measure(
                running.target,
                http_port,
                replica_pids(running.sid),
                args.repeat,
                args.only,
                args.attacker_nice,
            )
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
