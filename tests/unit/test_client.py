"""The command-line client against in-process stand-in servers (no Ray).

The servers here speak TF Serving's real gRPC method path and REST paths with the real protos,
answer with canned probabilities, and can be told to fail with a status, to stall past the
client's deadline, or to serve over TLS. What the client prints and returns is checked
exactly: the two-line answer of the original client, result lines, JSON, one-line errors and
distinct exit codes.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image
from tensorflow_serving.apis import predict_pb2

from client import grpc_client
from client.errors import ClientError, ExitCode
from client.images import to_mnist_tensor
from client.local.ports import free_port
from client.messages import (
    InputMode,
    ModelTarget,
    bytes_batch,
    images_batch,
    parse_predict_response,
    parse_rest_response,
    rest_body,
    rest_path,
)
from ray_app.protocol.tensors import from_ndarray, to_ndarray

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "data"
SAMPLE_LABELS = json.loads((DATA / "samples.json").read_text())
CONFIDENCE = 0.9993


def _probabilities(count: int) -> tuple[np.ndarray, np.ndarray]:
    """Image i is digit (7 + i) % 10 with probability 0.9993; the rest is spread evenly."""
    classes = (7 + np.arange(count)) % 10
    probabilities = np.full((count, 10), (1 - CONFIDENCE) / 9, dtype=np.float32)
    probabilities[np.arange(count), classes] = CONFIDENCE
    return probabilities, classes.astype(np.int64)


@dataclass
class Behaviour:
    """What the stand-in servers do with the next requests."""

    fail: tuple[grpc.StatusCode, str] | None = None
    refuse_image: bytes | None = None  # encoded image the server calls blank (by its index)
    delay_s: float = 0.0
    version: int = 3
    tensor_content: bool = False  # answer in tensor_content instead of TF Serving's typed fields
    requests: list = field(default_factory=list)


class _GrpcPredict:
    def __init__(self, behaviour: Behaviour) -> None:
        self.behaviour = behaviour

    def __call__(self, request: predict_pb2.PredictRequest, context: grpc.ServicerContext):
        self.behaviour.requests.append(request)
        time.sleep(self.behaviour.delay_s)
        if self.behaviour.fail:
            context.abort(*self.behaviour.fail)
        (name,) = request.inputs.keys()
        if name == "image_bytes" and self.behaviour.refuse_image in request.inputs[name].string_val:
            index = list(request.inputs[name].string_val).index(self.behaviour.refuse_image)
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"image {index}: image has no digit (blank)")
        count = to_ndarray(request.inputs[name]).shape[0]
        probabilities, classes = _probabilities(count)
        response = predict_pb2.PredictResponse()
        response.model_spec.name = request.model_spec.name
        response.model_spec.version.value = self.behaviour.version
        response.model_spec.signature_name = request.model_spec.signature_name
        packed = self.behaviour.tensor_content
        response.outputs["probabilities"].CopyFrom(from_ndarray(probabilities, tensor_content=packed))
        response.outputs["classes"].CopyFrom(from_ndarray(classes, tensor_content=packed))
        return response


def _start_grpc(
    behaviour: Behaviour, credentials: grpc.ServerCredentials | None = None
) -> tuple[grpc.Server, int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    handler = grpc.unary_unary_rpc_method_handler(
        _GrpcPredict(behaviour),
        request_deserializer=predict_pb2.PredictRequest.FromString,
        response_serializer=predict_pb2.PredictResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler("tensorflow.serving.PredictionService", {"Predict": handler})]
    )
    address = "localhost:0"
    port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    server.start()
    return server, port


@pytest.fixture(scope="module")
def grpc_server() -> Iterator[tuple[Behaviour, int]]:
    behaviour = Behaviour()
    server, port = _start_grpc(behaviour)
    yield behaviour, port
    server.stop(grace=None)


def _fresh(server: tuple[Behaviour, int]) -> tuple[Behaviour, int]:
    """A module-scoped stand-in server, its behaviour back to answering at once."""
    behaviour, _ = server
    behaviour.fail, behaviour.delay_s, behaviour.version, behaviour.tensor_content = None, 0.0, 3, False
    behaviour.refuse_image = None
    behaviour.requests.clear()
    return server


@pytest.fixture
def grpc_stub(grpc_server: tuple[Behaviour, int]) -> tuple[Behaviour, int]:
    return _fresh(grpc_server)


_HTTP_STATUS = {grpc.StatusCode.NOT_FOUND: 404, grpc.StatusCode.INVALID_ARGUMENT: 400}


@pytest.fixture(scope="module")
def rest_server() -> Iterator[tuple[Behaviour, int]]:
    behaviour = Behaviour()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            behaviour.requests.append((self.path, body))
            time.sleep(behaviour.delay_s)
            if behaviour.fail:
                code, message = behaviour.fail
                self._reply(_HTTP_STATUS.get(code, 500), {"error": message})
                return
            probabilities, classes = _probabilities(len(body["instances"]))
            rows = [{"probabilities": p.tolist(), "classes": int(c)} for p, c in zip(probabilities, classes)]
            self._reply(200, {"predictions": rows}, {"X-Model-Version": str(behaviour.version)})

        def _reply(self, status: int, document: dict, headers: dict | None = None) -> None:
            data = json.dumps(document).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            try:
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up (deadline tests)
                pass

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield behaviour, server.server_address[1]
    server.shutdown()
    server.server_close()


@pytest.fixture
def rest_stub(rest_server: tuple[Behaviour, int]) -> tuple[Behaviour, int]:
    return _fresh(rest_server)


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = grpc_client.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# -- answers ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("tensor_content", [False, True], ids=["typed-fields", "tensor-content"])
def test_one_image_prints_the_original_two_lines(grpc_stub, capsys, tensor_content) -> None:
    behaviour, port = grpc_stub
    behaviour.tensor_content = tensor_content  # TF Serving answers in typed fields; both are read
    code, out, err = _run(
        capsys, "--image", str(DATA / "0.png"), "--model", "mnist", "--host", "localhost", "--port", str(port)
    )
    assert (code, err) == (0, "")
    assert out == "Predicted Digit:  7\nPredicted Confidence:  0.9993\n"
    (request,) = behaviour.requests
    assert request.model_spec.name == "mnist"
    assert request.model_spec.signature_name == "serving_default"
    assert not request.model_spec.HasField("version") and not request.model_spec.version_label
    images = to_ndarray(request.inputs["images"])
    assert images.dtype == np.uint8 and images.shape == (1, 28, 28)
    # the client preprocesses with the server's code
    assert np.array_equal(images[0], to_mnist_tensor(DATA / "0.png", (DATA / "0.png").read_bytes()))


def test_send_bytes_sends_the_files_to_predict_image_bytes(grpc_stub, capsys) -> None:
    behaviour, port = grpc_stub
    code, out, _ = _run(
        capsys, "--image", str(DATA / "1.png"), str(DATA / "2.png"), "--port", str(port), "--send-bytes"
    )
    assert code == 0
    (request,) = behaviour.requests
    assert request.model_spec.signature_name == "predict_image_bytes"
    sent = to_ndarray(request.inputs["image_bytes"])
    assert list(sent) == [(DATA / "1.png").read_bytes(), (DATA / "2.png").read_bytes()]
    assert out.count("Predicted Digit:") == 2


@pytest.mark.parametrize(
    ("flags", "version", "label"),
    [(["--version", "2"], 2, ""), (["--version-label", "stable"], None, "stable")],
)
def test_version_and_label_go_into_the_model_spec(grpc_stub, capsys, flags, version, label) -> None:
    behaviour, port = grpc_stub
    code, _, _ = _run(capsys, "--image", str(DATA / "0.png"), "--port", str(port), *flags)
    assert code == 0
    spec = behaviour.requests[0].model_spec
    assert (spec.version.value if spec.HasField("version") else None, spec.version_label) == (version, label)


def test_directory_with_labels_prints_a_line_per_image_and_a_summary(grpc_stub, capsys) -> None:
    behaviour, port = grpc_stub
    code, out, _ = _run(
        capsys,
        "--image",
        str(DATA),
        "--port",
        str(port),
        "--labels",
        str(DATA / "samples.json"),
        "--batch-size",
        "4",
    )
    assert code == 0
    lines = out.splitlines()
    assert len(lines) == 11 and len(behaviour.requests) == 3  # 4 + 4 + 2 images
    assert lines[0].startswith(
        f"{DATA / '0.png'}  Predicted Digit:  7  Predicted Confidence:  0.9993  version 3"
    )
    # the stand-in answers 7, 8, 9, 0 per request: it agrees with the labels where they match
    answered = [(7 + i % 4) % 10 for i in range(10)]
    right = sum(answered[i] == SAMPLE_LABELS[f"{i}.png"] for i in range(10))
    assert lines[-1].startswith(f"10 image(s) from localhost:{port} (gRPC), model mnist version 3")
    assert lines[-1].endswith(f"; {right}/10 correct")
    assert sum("WRONG (expected" in line for line in lines) == 10 - right


def test_json_output(grpc_stub, capsys) -> None:
    _, port = grpc_stub
    code, out, _ = _run(
        capsys, "--image", str(DATA / "0.png"), str(DATA / "1.png"), "--port", str(port), "--json"
    )
    assert code == 0
    document = json.loads(out)
    assert document["protocol"] == "gRPC" and document["signature"] == "serving_default"
    first, second = document["predictions"]
    assert (first["digit"], second["digit"], first["version"]) == (7, 8, 3)
    assert first["confidence"] == pytest.approx(CONFIDENCE, abs=1e-6)
    assert len(first["probabilities"]) == 10


def test_rest_mode(rest_stub, capsys) -> None:
    behaviour, port = rest_stub
    behaviour.version = 5
    code, out, err = _run(
        capsys,
        "--image",
        str(DATA / "0.png"),
        str(DATA / "3.png"),
        "--rest",
        "--port",
        str(port),
        "--version",
        "5",
    )
    assert (code, err) == (0, "")
    ((path, body),) = behaviour.requests
    assert path == "/v1/models/mnist/versions/5:predict"
    assert body["signature_name"] == "serving_default"
    assert np.asarray(body["instances"]).shape == (2, 28, 28)
    assert "version 5" in out.splitlines()[0]
    assert "(REST)" in out.splitlines()[-1]


def test_rest_send_bytes_uses_b64(rest_stub, capsys) -> None:
    behaviour, port = rest_stub
    code, out, _ = _run(capsys, "--image", str(DATA / "0.png"), "--rest", "--port", str(port), "--send-bytes")
    assert code == 0 and out == "Predicted Digit:  7\nPredicted Confidence:  0.9993\n"
    ((path, body),) = behaviour.requests
    assert path == "/v1/models/mnist:predict" and body["signature_name"] == "predict_image_bytes"
    assert set(body["instances"][0]) == {"b64"}


# -- errors: one line on stderr, a distinct exit code each ------------------------------------------
@pytest.mark.parametrize("rest", [False, True], ids=["grpc", "rest"])
def test_unreachable_server(capsys, rest) -> None:
    port = free_port()  # free, so closed
    code, out, err = _run(
        capsys, "--image", str(DATA / "0.png"), "--port", str(port), *(["--rest"] if rest else [])
    )
    assert code == ExitCode.UNREACHABLE == 4
    assert out == "" and err.count("\n") == 1
    assert err.startswith(f"error: cannot reach {'http://' if rest else ''}localhost:{port}")
    assert "refused" in err.lower()


@pytest.mark.parametrize("stub", ["grpc_stub", "rest_stub"])
def test_deadline_exceeded(request, capsys, stub) -> None:
    behaviour, port = request.getfixturevalue(stub)
    behaviour.delay_s = 1.5
    rest = ["--rest"] if stub == "rest_stub" else []
    started = time.monotonic()
    code, out, err = _run(
        capsys, "--image", str(DATA / "0.png"), "--port", str(port), "--timeout-s", "0.3", *rest
    )
    assert time.monotonic() - started < 1.4  # gave up at the deadline, did not wait for the answer
    assert code == ExitCode.DEADLINE == 5
    assert out == "" and err.count("\n") == 1
    assert "within 0.3 s (--timeout-s)" in err


@pytest.mark.parametrize("stub", ["grpc_stub", "rest_stub"])
@pytest.mark.parametrize(
    ("status", "exit_code"),
    [
        (grpc.StatusCode.NOT_FOUND, ExitCode.NOT_FOUND),
        (grpc.StatusCode.INVALID_ARGUMENT, ExitCode.INVALID_ARGUMENT),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, ExitCode.SERVER_ERROR),
    ],
)
def test_server_status_codes(request, capsys, stub, status, exit_code) -> None:
    behaviour, port = request.getfixturevalue(stub)
    behaviour.fail = (status, "version 9 of model 'mnist' is not loaded")
    rest = ["--rest"] if stub == "rest_stub" else []
    code, out, err = _run(capsys, "--image", str(DATA / "0.png"), "--port", str(port), *rest)
    assert code == exit_code
    assert out == "" and err.count("\n") == 1
    if status is grpc.StatusCode.RESOURCE_EXHAUSTED and rest:
        assert err.startswith("error: server answered INTERNAL")  # 500 from the stand-in
    else:
        assert err.startswith(
            f"error: server answered {status.name}: version 9 of model 'mnist' is not loaded"
        )


def test_server_side_unavailable_is_a_server_error_not_unreachable(grpc_stub, capsys) -> None:
    behaviour, port = grpc_stub
    behaviour.fail = (grpc.StatusCode.UNAVAILABLE, "model 'mnist' has no version loaded yet")
    code, _, err = _run(capsys, "--image", str(DATA / "0.png"), "--port", str(port))
    assert code == ExitCode.SERVER_ERROR
    assert err.startswith("error: server answered UNAVAILABLE: model 'mnist' has no version loaded yet")


@contextlib.contextmanager
def _raw_tcp_peer(answer) -> Iterator[int]:
    """A TCP server on a free port that runs ``answer(connection)`` for one connection."""
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()

    def serve_one() -> None:
        connection, _ = listener.accept()
        with connection, contextlib.suppress(OSError):
            connection.recv(65536)
            answer(connection)

    threading.Thread(target=serve_one, daemon=True).start()
    try:
        yield listener.getsockname()[1]
    finally:
        listener.close()


def test_rest_to_a_peer_that_does_not_speak_http(capsys) -> None:
    def garbage(connection) -> None:
        connection.sendall(b"\x00\x00\x18\x04\x00\x00\x00\x00\x00 not http at all\r\n\r\n")

    with _raw_tcp_peer(garbage) as port:
        code, out, err = _run(
            capsys, "--image", str(DATA / "0.png"), "--rest", "--port", str(port), "--timeout-s", "5"
        )
    assert (code, out) == (ExitCode.UNREACHABLE, "")
    assert err.startswith(f"error: cannot talk HTTP to http://localhost:{port}: BadStatusLine")
    assert err.count("\n") == 1


def test_rest_deadline_covers_a_slowly_dripping_answer(capsys) -> None:
    """urllib's timeout is per socket read; the client's deadline is for the whole call."""

    def drip(connection) -> None:
        connection.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
        )
        for _ in range(40):  # a byte every 0.1 s: each read is quick, the answer never ends in time
            connection.sendall(b" ")
            time.sleep(0.1)

    started = time.monotonic()
    with _raw_tcp_peer(drip) as port:
        code, out, err = _run(
            capsys, "--image", str(DATA / "0.png"), "--rest", "--port", str(port), "--timeout-s", "0.8"
        )
    assert time.monotonic() - started < 2.5
    assert (code, out) == (ExitCode.DEADLINE, "")
    assert "within 0.8 s (--timeout-s)" in err


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot read labels file"),
        ("{not json", "is not JSON"),
        ('{"0.png": 12}', "must map file names to digits 0-9"),
    ],
)
def test_bad_labels_file_is_a_usage_error(grpc_stub, capsys, tmp_path, content, message) -> None:
    labels = tmp_path / "labels.json"
    if content is not None:
        labels.write_text(content)
    code, _, err = _run(
        capsys, "--image", str(DATA / "0.png"), "--port", str(grpc_stub[1]), "--labels", str(labels)
    )
    assert code == ExitCode.USAGE and message in err
    assert grpc_stub[0].requests == []


def test_missing_image_file(grpc_stub, capsys, tmp_path) -> None:
    behaviour, port = grpc_stub
    code, out, err = _run(capsys, "--image", str(tmp_path / "nope.png"), "--port", str(port))
    assert (code, out) == (ExitCode.IMAGE, "") and code == 3
    assert err == f"error: image file not found: {tmp_path / 'nope.png'}\n"
    assert behaviour.requests == []  # nothing was sent


def test_not_an_image_in_bytes_mode_is_caught_before_sending(grpc_stub, capsys, tmp_path) -> None:
    bad = tmp_path / "notes.png"
    bad.write_text("not a png")
    code, out, err = _run(
        capsys, "--image", str(DATA / "0.png"), str(bad), "--port", str(grpc_stub[1]), "--send-bytes"
    )
    assert code == ExitCode.IMAGE
    assert err.startswith(
        f"error: {bad}: not an image: image_bytes: cannot decode image: not a recognised image format"
    )
    assert out.startswith(f"{DATA / '0.png'}  Predicted Digit:  7")  # the good one is answered
    (request,) = grpc_stub[0].requests  # and only it was sent
    assert list(request.inputs["image_bytes"].string_val) == [(DATA / "0.png").read_bytes()]


def test_not_an_image_in_tensor_mode(grpc_stub, capsys, tmp_path) -> None:
    bad = tmp_path / "notes.png"
    bad.write_text("not a png")
    code, out, err = _run(capsys, "--image", str(DATA / "0.png"), str(bad), "--port", str(grpc_stub[1]))
    assert code == ExitCode.IMAGE
    assert (
        err
        == f"error: {bad}: not a usable digit image: image_bytes: cannot decode image: not a recognised image format (PNG, JPEG, GIF, BMP, TIFF, WEBP, PPM)\n"
    )
    assert "1 image(s) from" in out and "1 not answered (see errors)" in out
    (request,) = grpc_stub[0].requests
    assert to_ndarray(request.inputs["images"]).shape == (1, 28, 28)


def test_many_images_some_bad_each_reported_the_rest_answered(grpc_stub, capsys, tmp_path) -> None:
    blank = tmp_path / "blank.png"
    Image.new("L", (40, 40), 255).save(blank)
    missing = tmp_path / "gone.png"
    good = [DATA / "1.png", DATA / "2.png", DATA / "3.png"]
    code, out, err = _run(
        capsys,
        "--image",
        str(good[0]),
        str(blank),
        str(missing),
        *map(str, good[1:]),
        "--port",
        str(grpc_stub[1]),
    )
    assert code == ExitCode.IMAGE
    assert [line.split()[0] for line in out.splitlines()[:-1]] == [str(p) for p in good]
    assert "3 image(s) from" in out and "2 not answered" in out
    assert err.splitlines() == [
        f"error: image file not found: {missing}",
        f"error: {blank}: not a usable digit image: image has no digit (blank)",
    ]


def test_server_refusing_one_image_is_mapped_to_its_file(grpc_stub, capsys, tmp_path) -> None:
    behaviour, port = grpc_stub
    behaviour.refuse_image = (DATA / "2.png").read_bytes()
    paths = [DATA / "1.png", DATA / "2.png", DATA / "3.png"]
    code, out, err = _run(capsys, "--image", *map(str, paths), "--port", str(port), "--send-bytes", "--json")
    assert code == ExitCode.INVALID_ARGUMENT
    refused = (
        f"{DATA / '2.png'}: server answered INVALID_ARGUMENT: image has no digit (blank) (localhost:{port})"
    )
    assert err == f"error: {refused}\n"
    document = json.loads(out)
    assert [p["image"] for p in document["predictions"]] == [str(DATA / "1.png"), str(DATA / "3.png")]
    assert document["failures"] == [{"image": str(DATA / "2.png"), "error": refused}]
    # The batch of three was refused, then sent again without the refused image.
    assert [len(r.inputs["image_bytes"].string_val) for r in behaviour.requests] == [3, 2]


def test_a_refused_single_image_keeps_the_one_line_error(grpc_stub, capsys) -> None:
    behaviour, port = grpc_stub
    behaviour.refuse_image = (DATA / "5.png").read_bytes()
    code, out, err = _run(capsys, "--image", str(DATA / "5.png"), "--port", str(port), "--send-bytes")
    assert (code, out) == (ExitCode.INVALID_ARGUMENT, "")
    assert err == (
        f"error: {DATA / '5.png'}: server answered INVALID_ARGUMENT: image has no digit (blank) (localhost:{port})\n"
    )


@pytest.mark.parametrize("content", [b"", None], ids=["empty-file", "empty-directory"])
def test_empty_inputs(grpc_stub, capsys, tmp_path, content) -> None:
    path = tmp_path / "x.png"
    if content is None:
        path = tmp_path / "empty"
        path.mkdir()
    else:
        path.write_bytes(content)
    code, _, err = _run(capsys, "--image", str(path), "--port", str(grpc_stub[1]))
    assert code == ExitCode.IMAGE
    assert err.startswith("error: image file is empty" if content is not None else "error: no image files (")


@pytest.mark.parametrize(
    "argv",
    [
        ["--version", "1", "--version-label", "x"],
        ["--timeout-s", "0"],
        ["--batch-size", "0"],
        ["--port", "70000"],
        ["--version", "0"],
    ],
)
def test_bad_command_lines_exit_2(capsys, argv) -> None:
    with pytest.raises(SystemExit) as info:
        grpc_client.main(["--image", str(DATA / "0.png"), *argv])
    assert info.value.code == ExitCode.USAGE
    assert "error:" in capsys.readouterr().err


def test_script_mode_has_no_traceback_and_no_tensorflow_noise() -> None:
    port = free_port()  # free, so closed
    started = time.monotonic()
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "client" / "grpc_client.py"),
            "--image",
            "data/0.png",
            "--port",
            str(port),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == ExitCode.UNREACHABLE
    assert result.stdout == ""
    assert result.stderr.startswith("error: cannot reach") and result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr and "I0000" not in result.stderr
    assert time.monotonic() - started < 30


# -- TLS --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tls_files(tmp_path_factory) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    directory = tmp_path_factory.mktemp("tls")
    key, cert = directory / "key.pem", directory / "cert.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return key, cert


def test_tls_with_ca_cert(tls_files, capsys) -> None:
    key, cert = tls_files
    behaviour = Behaviour()
    credentials = grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])
    server, port = _start_grpc(behaviour, credentials)
    try:
        code, out, err = _run(
            capsys, "--image", str(DATA / "0.png"), "--port", str(port), "--ca-cert", str(cert)
        )
        assert (code, err) == (0, "")
        assert out == "Predicted Digit:  7\nPredicted Confidence:  0.9993\n"
        # without the CA the self-signed certificate is not trusted: the handshake fails
        code, out, err = _run(
            capsys, "--image", str(DATA / "0.png"), "--port", str(port), "--tls", "--timeout-s", "5"
        )
        assert (
            code == ExitCode.UNREACHABLE
            and out == ""
            and err.startswith(f"error: cannot reach localhost:{port}")
        )
        # and a plain-text client cannot talk to a TLS server
        code, _, err = _run(capsys, "--image", str(DATA / "0.png"), "--port", str(port), "--timeout-s", "5")
        assert code == ExitCode.UNREACHABLE
    finally:
        server.stop(grace=None)


def test_client_certificate_for_mutual_tls(capsys, tmp_path) -> None:
    from tests.certs import CertificateAuthority

    ca = CertificateAuthority(tmp_path)
    server, client = ca.issue("server", server=True), ca.issue("client", server=False)
    credentials = grpc.ssl_server_credentials(
        [(server.key.read_bytes(), server.cert.read_bytes())],
        root_certificates=ca.cert.read_bytes(),
        require_client_auth=True,
    )
    grpc_server, port = _start_grpc(Behaviour(), credentials)
    image = str(DATA / "0.png")
    try:
        base = ("--image", image, "--port", str(port), "--ca-cert", str(ca.cert), "--timeout-s", "5")
        code, out, err = _run(
            capsys, *base, "--client-cert", str(client.cert), "--client-key", str(client.key)
        )
        assert (code, err) == (0, "") and out.startswith("Predicted Digit:  7")
        code, _, err = _run(capsys, *base)  # the server asks for a certificate: none, no answer
        assert code == ExitCode.UNREACHABLE
    finally:
        grpc_server.stop(grace=None)


def test_client_cert_without_key_is_a_usage_error(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        _run(capsys, "--image", str(DATA / "0.png"), "--client-cert", "c.pem")
    assert (
        exit_info.value.code == 2 and "--client-cert and --client-key go together" in capsys.readouterr().err
    )


def test_bad_ca_cert_for_https_is_a_usage_error(capsys, tmp_path) -> None:
    bad = tmp_path / "ca.pem"
    bad.write_bytes(b"\x30\x82 not a certificate")
    code, _, err = _run(capsys, "--image", str(DATA / "0.png"), "--rest", "--ca-cert", str(bad))
    assert code == ExitCode.USAGE
    assert err.startswith(f"error: cannot use CA certificate {bad}")


def test_unreadable_ca_cert_is_a_usage_error(capsys, tmp_path) -> None:
    code, _, err = _run(capsys, "--image", str(DATA / "0.png"), "--ca-cert", str(tmp_path / "ca.pem"))
    assert code == ExitCode.USAGE
    assert err.startswith(f"error: cannot read CA certificate {tmp_path / 'ca.pem'}")


# -- the library part (shared with bench/) ----------------------------------------------------------
def test_model_target_validation() -> None:
    with pytest.raises(ValueError, match="not both"):
        ModelTarget("mnist", version=1, version_label="stable")
    with pytest.raises(ValueError, match="empty"):
        ModelTarget("")


def test_rest_paths_and_bodies() -> None:
    assert rest_path(ModelTarget("mnist")) == "/v1/models/mnist:predict"
    assert rest_path(ModelTarget("mnist", version_label="a b")) == "/v1/models/mnist/labels/a%20b:predict"
    body = rest_body(images_batch([np.zeros((28, 28), np.uint8)]))
    assert body["signature_name"] == "serving_default" and np.asarray(body["instances"]).shape == (1, 28, 28)
    assert rest_body(bytes_batch([b"\x89PNG"]))["instances"] == [{"b64": "iVBORw=="}]
    assert bytes_batch([b"x"]).mode is InputMode.BYTES


@pytest.mark.parametrize(
    ("outputs", "message"),
    [
        ({"classes": np.array([1])}, "missing output(s) probabilities"),
        (
            {"probabilities": np.zeros((2, 10), np.float32), "classes": np.array([1, 2])},
            "expected 1 predictions",
        ),
        ({"probabilities": np.zeros((1, 10), np.float32), "classes": np.array([12])}, "not a digit"),
    ],
)
def test_malformed_responses_are_client_errors(outputs, message) -> None:
    response = predict_pb2.PredictResponse()
    for name, value in outputs.items():
        response.outputs[name].CopyFrom(from_ndarray(value))
    with pytest.raises(ClientError, match="malformed response") as info:
        parse_predict_response(response, expected=1)
    assert message in str(info.value) and info.value.exit_code == ExitCode.SERVER_ERROR
    rows = {
        "predictions": [
            {k: v[i].tolist() for k, v in outputs.items()} for i in range(len(outputs["classes"]))
        ]
    }
    with pytest.raises(ClientError, match="malformed response"):
        parse_rest_response(rows, expected=1, version=None)


def test_library_use_leaves_tensorflow_importable() -> None:
    """bench/ and other library users build requests, then import TensorFlow's own protos."""
    code = (
        "from client.messages import ModelTarget, images_batch, predict_request\n"
        "import numpy as np\n"
        "predict_request(ModelTarget('mnist'), images_batch([np.zeros((28, 28), np.uint8)]))\n"
        "from tensorflow_serving.apis import prediction_service_pb2_grpc\n"
        "import tensorflow as tf\n"
        "print(tf.train.Example.__name__)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "Example"
