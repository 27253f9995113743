"""Slow clients beside a normal one: does a crowd of half-sent requests hold the service?

The attack (issue 15, "Slow clients"): ``count`` connections that each send a request's headers
and one byte of a 1,000-byte body, then wait. Over HTTP/1.1 (a REST predict), or over HTTP/2 as
gRPC (a Predict stream whose message is never finished, ``streams_per_connection`` per
connection). A connection the server closes is opened again at once, so ``count`` stay open
for as long as the attack lasts. Beside it, a normal client sends 1-image gRPC Predicts in a
closed loop with a deadline; its p50/p99 and failures are what we compare.

    python -m bench.slow_clients --grpc-port 9000 --http-port 8000 [--ca-cert ca.crt]   # a running app
    python -m bench.slow_clients --app MODEL_BASE_PATH --out bench/results/slow-clients.json
        # starts serve_configs/local.yaml's app: Ray's HAProxy alone, then a plaintext edge in front
"""

from __future__ import annotations

import argparse
import contextlib
import json
import selectors
import socket
import ssl
import struct
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np

BODY_BYTES = 1000
_PREDICT_PATH = "/tensorflow.serving.PredictionService/Predict"
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


@dataclass(frozen=True)
class Target:
    host: str
    port: int
    cafile: str | None = None  # TLS, trusting this CA; None: plaintext

    @property
    def tls(self) -> bool:
        return self.cafile is not None


def _connect(target: Target, context: ssl.SSLContext | None) -> socket.socket:
    sock = socket.create_connection((target.host, target.port), timeout=5)
    if context is not None:
        sock = context.wrap_socket(sock, server_hostname=target.host)
    return sock


def _http1_opening(target: Target) -> bytes:
    return (
        f"POST /v1/models/mnist:predict HTTP/1.1\r\nHost: {target.host}:{target.port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {BODY_BYTES}\r\n\r\n{{"
    ).encode()


def _frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def _hpack_literal(name: str, value: str) -> bytes:
    """One header as an HPACK literal without indexing, no Huffman (RFC 7541, 6.2.2)."""

    def string(text: str) -> bytes:
        data = text.encode()
        if len(data) >= 127:
            raise ValueError("header too long for this encoder")
        return bytes([len(data)]) + data

    return b"\x00" + string(name) + string(value)


def _h2_opening(target: Target, streams: int) -> bytes:
    """Preface, SETTINGS, then ``streams`` Predict calls: headers, and one byte of a 1,000-byte
    gRPC message (its 5-byte length prefix declares 1,000) without END_STREAM."""
    frames = [_H2_PREFACE, _frame(0x4, 0, 0, b"")]
    headers = b"".join(
        _hpack_literal(n, v)
        for n, v in (
            (":method", "POST"),
            (":scheme", "https" if target.tls else "http"),
            (":path", _PREDICT_PATH),
            (":authority", f"{target.host}:{target.port}"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        )
    )
    message_start = b"\x00" + struct.pack(">I", BODY_BYTES) + b"\x0a"
    for i in range(streams):
        stream = 2 * i + 1
        frames.append(_frame(0x1, 0x4, stream, headers))  # HEADERS, END_HEADERS
        frames.append(_frame(0x0, 0x0, stream, message_start))  # DATA, not END_STREAM
    return b"".join(frames)


@dataclass
class SlowAttack:
    """Keeps ``count`` half-sent requests open against ``target`` until stopped."""

    target: Target
    count: int
    protocol: str = "http"  # "http" (HTTP/1.1 REST) | "grpc" (HTTP/2 streams)
    streams_per_connection: int = 10
    opened: int = 0
    closed_by_server: int = 0
    refused: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)

    def _connections_wanted(self) -> int:
        per = self.streams_per_connection if self.protocol == "grpc" else 1
        return max(1, self.count // per)

    def _open(self, context: ssl.SSLContext | None) -> socket.socket | None:
        try:
            sock = _connect(self.target, context)
            if self.protocol == "grpc":
                sock.sendall(_h2_opening(self.target, self.streams_per_connection))
            else:
                sock.sendall(_http1_opening(self.target))
        except (OSError, ssl.SSLError):
            self.refused += 1
            return None
        sock.setblocking(False)
        self.opened += 1
        return sock

    def run(self) -> None:
        context = None
        if self.target.cafile is not None:
            context = ssl.create_default_context(cafile=self.target.cafile)
            context.set_alpn_protocols(["h2" if self.protocol == "grpc" else "http/1.1"])
        selector = selectors.DefaultSelector()
        sockets: set[socket.socket] = set()
        acknowledged: set[socket.socket] = set()
        try:
            while not self._stop.is_set():
                while len(sockets) < self._connections_wanted() and not self._stop.is_set():
                    sock = self._open(context)
                    if sock is None:
                        time.sleep(0.05)
                        break
                    sockets.add(sock)
                    selector.register(sock, selectors.EVENT_READ)
                for key, _ in selector.select(timeout=0.2):
                    sock = key.fileobj
                    try:
                        data = sock.recv(65536)
                    except (BlockingIOError, ssl.SSLWantReadError):
                        continue
                    except (OSError, ssl.SSLError):
                        data = b""
                    if self.protocol == "grpc" and data and sock not in acknowledged:
                        # The server's first frame is its SETTINGS: acknowledge it once.
                        acknowledged.add(sock)
                        with contextlib.suppress(OSError, ssl.SSLError):
                            sock.send(_frame(0x4, 0x1, 0, b""))
                    if not data or (self.protocol == "http" and data.startswith(b"HTTP/")):
                        self.closed_by_server += 1
                        selector.unregister(sock)
                        sockets.discard(sock)
                        acknowledged.discard(sock)
                        sock.close()
        finally:
            for sock in sockets:
                sock.close()
            selector.close()

    def counters(self) -> dict[str, int]:
        return {"opened": self.opened, "closed_by_server": self.closed_by_server, "refused": self.refused}

    def run_for(self, duration_s: float) -> dict[str, int]:
        """Attack for ``duration_s``; the counters."""
        threading.Timer(duration_s, self._stop.set).start()
        self.run()
        return self.counters()

    @contextlib.contextmanager
    def running(self) -> Iterator[SlowAttack]:
        """The attack in a thread of this process, while the block runs."""
        thread = threading.Thread(target=self.run, name="slow-attack", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            thread.join(timeout=10)


def _attack_process(target: Target, count: int, protocol: str, duration_s: float, results: Any) -> None:
    results.put(SlowAttack(target, count, protocol).run_for(duration_s))


@contextlib.contextmanager
def attack_in_another_process(
    target: Target, count: int, protocol: str, duration_s: float
) -> Iterator[dict[str, int]]:
    """The attack in a process of its own (it must not take the measuring client's CPU or GIL);
    yields a dict that holds its counters once the block is over."""
    import multiprocessing

    spawn = multiprocessing.get_context("spawn")
    results = spawn.Queue()
    process = spawn.Process(
        target=_attack_process, args=(target, count, protocol, duration_s, results), daemon=True
    )
    process.start()
    counters: dict[str, int] = {}
    try:
        yield counters
    finally:
        counters.update(results.get(timeout=duration_s + 60))
        process.join(timeout=30)


def _one_image_request(model: str) -> Any:
    from client.messages import ModelTarget, images_batch, predict_request
    from training.data import load_mnist

    return predict_request(ModelTarget(model), images_batch([load_mnist().test.images[0]]))


def normal_client(
    channel: grpc.Channel,
    request: Any,
    duration_s: float,
    timeout_s: float = 5.0,
    metadata: Sequence[tuple[str, str]] | None = None,
) -> dict[str, Any]:
    """1-image Predicts one after another for ``duration_s`` (with ``metadata``, e.g. a token):
    latency percentiles and failures."""
    predict = channel.unary_unary(
        _PREDICT_PATH, request_serializer=lambda m: m.SerializeToString(), response_deserializer=lambda b: b
    )
    latencies_s: list[float] = []
    failures: Counter[str] = Counter()
    end = time.monotonic() + duration_s
    while time.monotonic() < end:
        started = time.monotonic()
        try:
            predict(request, timeout=timeout_s, metadata=metadata)
            latencies_s.append(time.monotonic() - started)
        except grpc.RpcError as exc:
            failures[exc.code().name] += 1

    def pct(q: float) -> float | None:
        return round(float(np.percentile(latencies_s, q)) * 1000, 1) if latencies_s else None

    return {"ok": len(latencies_s), "failed": dict(failures), "p50_ms": pct(50), "p99_ms": pct(99)}


def channel_for(address: str, ca_cert: bytes | None = None) -> grpc.Channel:
    if ca_cert is None:
        return grpc.insecure_channel(address)
    return grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=ca_cert))


def measure(
    grpc_address: str,
    http: Target,
    grpc_target: Target,
    *,
    count: int = 300,
    duration_s: float = 10.0,
    model: str = "mnist",
    ca_cert: bytes | None = None,
) -> dict[str, Any]:
    """The normal client alone, beside ``count`` half-sent HTTP requests, beside ``count`` half-open
    gRPC streams."""
    request = _one_image_request(model)
    results: dict[str, Any] = {}
    with channel_for(grpc_address, ca_cert) as channel:
        normal_client(channel, request, 2.0)  # warm-up
        results["alone"] = normal_client(channel, request, duration_s)
        for protocol, target in (("http", http), ("grpc", grpc_target)):
            with attack_in_another_process(target, count, protocol, duration_s + 3.0) as counters:
                time.sleep(2.0)  # the crowd is in place
                point = normal_client(channel, request, duration_s)
            point["attack"] = counters
            results[f"beside {count} half-sent {protocol}"] = point
            time.sleep(2.0)
    return results


def _with_app(args: argparse.Namespace) -> dict[str, Any]:
    """``serve run`` serve_configs/local.yaml (bench.run_all's ray-haproxy variant): the attack on
    Ray's HAProxy itself, then on a plaintext edge in front of it."""
    import tempfile
    from pathlib import Path

    from bench.servers import serve_app
    from bench.variants import VARIANTS
    from client.local.ports import free_port
    from ray_app.edge.config import EdgeConfig
    from ray_app.edge.supervisor import EdgeProcess

    app_args = argparse.Namespace(
        model_name=args.model,
        model_base_path=Path(args.app).resolve(),
        ready_timeout_s=240.0,
        keep_ray_tmp=False,
    )
    workdir = Path(tempfile.mkdtemp(prefix="slow-clients-"))
    results: dict[str, Any] = {}
    with serve_app(VARIANTS["ray-haproxy"], app_args, workdir) as running:
        grpc_port, http_port = int(running.target.rsplit(":", 1)[1]), running.notes["http_port"]
        results["Ray's HAProxy (no edge)"] = measure(
            running.target, Target("127.0.0.1", http_port), Target("127.0.0.1", grpc_port),
            count=args.count, duration_s=args.duration_s, model=args.model,
        )  # fmt: skip
        edge_config = EdgeConfig(
            bind_host="127.0.0.1", grpc_port=free_port(), http_port=free_port(),
            upstream={"grpc_port": grpc_port, "http_port": http_port},
        )  # fmt: skip
        edge = EdgeProcess(edge_config, workdir / "edge")
        edge.start()
        try:
            results["through the edge (plaintext)"] = measure(
                f"127.0.0.1:{edge_config.grpc_port}",
                Target("127.0.0.1", edge_config.http_port), Target("127.0.0.1", edge_config.grpc_port),
                count=args.count, duration_s=args.duration_s, model=args.model,
            )  # fmt: skip
        finally:
            edge.stop()
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--grpc-port", type=int)
    parser.add_argument("--http-port", type=int)
    parser.add_argument(
        "--app",
        default=None,
        help="a model base path: start local.yaml's app on it and compare without/with the edge",
    )
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--duration-s", type=float, default=10.0)
    parser.add_argument("--model", default="mnist")
    parser.add_argument("--ca-cert", default=None, help="TLS: the CA of the server's certificate")
    parser.add_argument("--out", default=None, help="also write the results (JSON) here")
    args = parser.parse_args(argv)
    if args.app:
        results = _with_app(args)
        print(json.dumps(results, indent=2))
        if args.out:
            with open(args.out, "w") as out:
                json.dump(
                    {"date": time.strftime("%Y-%m-%d"), "count": args.count, "results": results},
                    out,
                    indent=2,
                )
        return
    if args.grpc_port is None or args.http_port is None:
        parser.error("--grpc-port and --http-port (or --app)")
    ca = open(args.ca_cert, "rb").read() if args.ca_cert else None
    results = measure(
        f"{args.host}:{args.grpc_port}",
        Target(args.host, args.http_port, args.ca_cert),
        Target(args.host, args.grpc_port, args.ca_cert),
        count=args.count,
        duration_s=args.duration_s,
        model=args.model,
        ca_cert=ca,
    )
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
