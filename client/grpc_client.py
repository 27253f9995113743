"""Ask the MNIST model which digit an image shows, over TF Serving's gRPC API (or its REST API).

    python client/grpc_client.py --image data/0.png --model mnist --host localhost --port 9000
    Predicted Digit:  7
    Predicted Confidence:  0.9993

Several ``--image`` paths (or directories) print one line per image and a summary; an image
that cannot be read, or that the server refuses (e.g. blank), is reported on its own line on
stderr, the others are answered, and the exit code says what failed. By default
the client preprocesses each image into MNIST's uint8 28x28 form (the server's own code) and
calls ``serving_default``; ``--send-bytes`` sends the encoded files to ``predict_image_bytes``
and lets the server do it. Every call has a deadline (``--timeout-s``).

Exit codes: 0 answered, 2 bad command line, 3 image file missing/unreadable/not an image
(checked here in both modes; whether it shows a digit is the server's call in bytes mode),
4 server unreachable, 5 deadline exceeded, 6 NOT_FOUND (model, version), 7 INVALID_ARGUMENT (also an unknown label, as in TF Serving),
8 any other server error. Failures print one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __name__ == "__main__" and not __package__:
    # Run as a script (``python client/grpc_client.py``): make the repo root importable.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from client.errors import ClientError, ExitCode  # noqa: E402
from client.images import (  # noqa: E402
    check_decodable,
    find_image_paths,
    load_labels,
    read_image_bytes,
    to_mnist_tensor,
)
from client.messages import Batch, InputMode, ModelTarget, bytes_batch, images_batch  # noqa: E402

DEFAULT_GRPC_PORT = 9000
DEFAULT_HTTP_PORT = 8000
DEFAULT_TIMEOUT_S = 10.0
DEFAULT_BATCH_SIZE = 32  # images per request


@dataclass(frozen=True)
class ClientConfig:
    """One run of the client, validated from the command line."""

    images: tuple[str, ...]
    target: ModelTarget
    host: str = "localhost"
    port: int = DEFAULT_GRPC_PORT
    rest: bool = False
    mode: InputMode = InputMode.TENSOR
    timeout_s: float = DEFAULT_TIMEOUT_S
    batch_size: int = DEFAULT_BATCH_SIZE
    tls: bool = False
    ca_cert: Path | None = None
    token: str | None = field(default=None, repr=False)  # bearer token (never printed)
    client_cert: Path | None = None  # with client_key: mutual TLS
    client_key: Path | None = None
    labels: Path | None = None
    json_output: bool = False

    @property
    def protocol(self) -> str:
        return "REST" if self.rest else "gRPC"


@dataclass(frozen=True)
class ImageResult:
    """The answer for one image file."""

    path: str
    digit: int
    confidence: float
    probabilities: tuple[float, ...]
    version: int | None
    expected: int | None = None

    @property
    def correct(self) -> bool | None:
        return None if self.expected is None else self.digit == self.expected


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mnist-client",
        description=__doc__.split("\n\n")[0],
        epilog="Exit codes: " + ", ".join(f"{c.value} {c.name.lower()}" for c in ExitCode),
    )
    parser.add_argument(
        "--image",
        action="extend",
        nargs="+",
        required=True,
        metavar="PATH",
        help="image file(s) or directories of images (PNG, JPEG, ...); repeatable",
    )
    parser.add_argument("--model", default="mnist", help="model name (default: mnist)")
    parser.add_argument("--host", default="localhost")
    parser.add_argument(
        "--port",
        type=int,
        default=None,
        help=f"server port (default: {DEFAULT_GRPC_PORT} for gRPC, {DEFAULT_HTTP_PORT} with --rest)",
    )
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--version", type=int, default=None, help="ask this model version (default: latest)")
    which.add_argument("--version-label", default=None, help="ask the version with this label, e.g. stable")
    parser.add_argument(
        "--timeout-s", type=float, default=DEFAULT_TIMEOUT_S, help="deadline of each request, in seconds"
    )
    parser.add_argument("--rest", action="store_true", help="use TF Serving's REST API instead of gRPC")
    parser.add_argument(
        "--send-bytes",
        action="store_true",
        help="send the encoded files (signature predict_image_bytes); default: preprocess here and "
        "send uint8 [N,28,28] tensors (serving_default)",
    )
    parser.add_argument(
        "--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="images per request (default: 32)"
    )
    parser.add_argument(
        "--labels", type=Path, default=None, help='JSON {"file name": digit} to check answers'
    )
    parser.add_argument("--json", action="store_true", dest="json_output", help="print one JSON object")
    parser.add_argument("--tls", action="store_true", help="TLS (gRPC over TLS, or HTTPS with --rest)")
    parser.add_argument(
        "--ca-cert", type=Path, default=None, help="PEM CA certificate to trust (implies --tls)"
    )
    token = parser.add_mutually_exclusive_group()
    token.add_argument("--token", default=None, help=f"bearer token (default: ${TOKEN_ENV})")
    token.add_argument("--token-file", type=Path, default=None, help="read the bearer token from this file")
    parser.add_argument(
        "--client-cert",
        type=Path,
        default=None,
        help="PEM client certificate for servers with mutual TLS (with --client-key; implies --tls)",
    )
    parser.add_argument("--client-key", type=Path, default=None, help="PEM key of --client-cert")
    return parser


TOKEN_ENV = "MNIST_TOKEN"


def _token(args: argparse.Namespace, parser: argparse.ArgumentParser) -> str | None:
    """--token, else the first line of --token-file, else $MNIST_TOKEN (None: send none)."""
    if args.token_file is not None:
        try:
            lines = args.token_file.read_text().split()
        except OSError as exc:
            parser.error(f"--token-file {args.token_file}: {exc.strerror or exc}")
        if not lines:
            parser.error(f"--token-file {args.token_file} is empty")
        return lines[0]
    return args.token or os.environ.get(TOKEN_ENV) or None


def parse_args(argv: Sequence[str] | None = None) -> ClientConfig:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.timeout_s > 0:
        parser.error(f"--timeout-s must be > 0, got {args.timeout_s}")
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.port is not None and not 0 < args.port < 65536:
        parser.error(f"--port must be in 1-65535, got {args.port}")
    if (args.client_cert is None) != (args.client_key is None):
        parser.error("--client-cert and --client-key go together")
    try:
        target = ModelTarget(args.model, version=args.version, version_label=args.version_label)
    except ValueError as exc:
        parser.error(str(exc))
    return ClientConfig(
        images=tuple(args.image),
        target=target,
        host=args.host,
        port=args.port or (DEFAULT_HTTP_PORT if args.rest else DEFAULT_GRPC_PORT),
        rest=args.rest,
        mode=InputMode.BYTES if args.send_bytes else InputMode.TENSOR,
        timeout_s=args.timeout_s,
        batch_size=args.batch_size,
        tls=args.tls or args.ca_cert is not None or args.client_cert is not None,
        ca_cert=args.ca_cert,
        token=_token(args, parser),
        client_cert=args.client_cert,
        client_key=args.client_key,
        labels=args.labels,
        json_output=args.json_output,
    )


@dataclass(frozen=True)
class ImageFailure:
    """An image (or a name given) that got no answer: why, and the exit code of that failure."""

    path: str | None  # None for a name that is no image file (missing, empty directory)
    message: str
    exit_code: ExitCode


@dataclass(frozen=True)
class Outcome:
    """Everything one run of the client found out."""

    results: list[ImageResult]
    failures: list[ImageFailure]
    elapsed_s: float
    given: int  # images named (files found plus names that failed)


# How the server names the image it refused in a batch (ray_app.predictor: "image 3: ...").
_IMAGE_INDEX = re.compile(r"\bimage (\d+): (.*)$", re.DOTALL)


def _prepare(paths: list[Path], config: ClientConfig) -> tuple[list[tuple[Path, Any]], list[ImageFailure]]:
    """Read (and in tensor mode preprocess) every image before the first request is sent."""
    ready: list[tuple[Path, Any]] = []
    failures: list[ImageFailure] = []
    for path in paths:
        try:
            data = read_image_bytes(path)
            if config.mode is InputMode.TENSOR:
                ready.append((path, to_mnist_tensor(path, data)))
            else:  # the server decodes and preprocesses; a file that is no image is caught here
                check_decodable(path, data)
                ready.append((path, data))
        except ClientError as exc:
            failures.append(ImageFailure(str(path), str(exc), exc.exit_code))
    return ready, failures


def _batch(items: list[tuple[Path, Any]], config: ClientConfig) -> Batch:
    inputs = [item for _, item in items]
    return images_batch(inputs) if config.mode is InputMode.TENSOR else bytes_batch(inputs)


def _refused_image(exc: ClientError, count: int) -> int | None:
    """The index of the image the server refused in a batch of ``count``, else None."""
    match = _IMAGE_INDEX.search(str(exc))
    if match is None or not 0 <= int(match.group(1)) < count:
        return None
    return int(match.group(1))


def classify(config: ClientConfig) -> Outcome:
    """Send the images; one result per answered image, one failure per image that got none.

    Errors that concern the server or the request as a whole (unreachable, deadline, unknown
    model) are raised as ClientError; an image the server refuses by index is dropped from
    its batch, reported, and the rest of the batch is sent again.
    """
    from client.transport import ClientCertificate, GrpcTransport, RestTransport

    paths, missing = find_image_paths(config.images)
    failures = [ImageFailure(None, str(exc), exc.exit_code) for exc in missing]
    expected = load_labels(config.labels) if config.labels else {}
    ready, unreadable = _prepare(paths, config)
    failures.extend(unreadable)
    given = len(paths) + len(missing)
    if not ready:
        return Outcome([], failures, 0.0, given)
    transport_class = RestTransport if config.rest else GrpcTransport
    results: list[ImageResult] = []
    elapsed_s = 0.0
    with transport_class(
        config.host,
        config.port,
        timeout_s=config.timeout_s,
        tls=config.tls,
        ca_cert=config.ca_cert,
        token=config.token,
        client_cert=ClientCertificate(config.client_cert, config.client_key) if config.client_cert else None,
    ) as transport:
        for start in range(0, len(ready), config.batch_size):
            chunk = ready[start : start + config.batch_size]
            while chunk:
                started = time.perf_counter()
                try:
                    predictions = transport.predict(config.target, _batch(chunk, config))
                except ClientError as exc:
                    index = _refused_image(exc, len(chunk))
                    if index is None:
                        raise
                    path = chunk[index][0]
                    reason = _IMAGE_INDEX.sub(lambda m: m.group(2), str(exc))
                    failures.append(ImageFailure(str(path), f"{path}: {reason}", exc.exit_code))
                    chunk = chunk[:index] + chunk[index + 1 :]
                    continue
                finally:
                    elapsed_s += time.perf_counter() - started
                for i, (path, _) in enumerate(chunk):
                    results.append(
                        ImageResult(
                            path=str(path),
                            digit=predictions.digit(i),
                            confidence=predictions.confidence(i),
                            probabilities=tuple(float(p) for p in predictions.probabilities[i]),
                            version=predictions.version,
                            expected=expected.get(path.name),
                        )
                    )
                break
    return Outcome(results, failures, elapsed_s, given)


def format_text(outcome: Outcome, config: ClientConfig) -> str:
    """The answers as text (stdout); the failures are printed apart, on stderr."""
    results = outcome.results
    if not results:
        return ""
    if outcome.given == 1 and results[0].expected is None:
        only = results[0]
        return f"Predicted Digit:  {only.digit}\nPredicted Confidence:  {only.confidence:.4f}"
    width = max(len(r.path) for r in results)
    lines = []
    for r in results:
        line = f"{r.path:<{width}}  Predicted Digit:  {r.digit}  Predicted Confidence:  {r.confidence:.4f}"
        if r.version is not None:
            line += f"  version {r.version}"
        if r.expected is not None:
            line += "  ok" if r.correct else f"  WRONG (expected {r.expected})"
        lines.append(line)
    versions = sorted({r.version for r in results if r.version is not None})
    summary = (
        f"{len(results)} image(s) from {config.host}:{config.port} ({config.protocol}), model "
        f"{config.target.name}"
        + (f" version {', '.join(map(str, versions))}" if versions else "")
        + f", {outcome.elapsed_s * 1000:.0f} ms in requests"
    )
    checked = [r for r in results if r.expected is not None]
    if checked:
        summary += f"; {sum(bool(r.correct) for r in checked)}/{len(checked)} correct"
    if outcome.failures:
        summary += f"; {len(outcome.failures)} not answered (see errors)"
    return "\n".join([*lines, summary])


def format_json(outcome: Outcome, config: ClientConfig) -> str:
    results = outcome.results
    checked = [r for r in results if r.expected is not None]
    document: dict[str, Any] = {
        "address": f"{config.host}:{config.port}",
        "protocol": config.protocol,
        "model": config.target.name,
        "mode": config.mode.value,
        "signature": config.mode.signature,
        "elapsed_ms": round(outcome.elapsed_s * 1000, 3),
        "predictions": [
            {
                "image": r.path,
                "digit": r.digit,
                "confidence": r.confidence,
                "version": r.version,
                "probabilities": list(r.probabilities),
                **({"expected": r.expected, "correct": r.correct} if r.expected is not None else {}),
            }
            for r in results
        ],
    }
    if checked:
        document["correct"] = sum(bool(r.correct) for r in checked)
        document["checked"] = len(checked)
    if outcome.failures:
        document["failures"] = [{"image": f.path, "error": f.message} for f in outcome.failures]
    return json.dumps(document, indent=2)


def main(argv: Sequence[str] | None = None) -> int:
    """The command line.

    Every image that can be answered is; each one that cannot gets an ``error:`` line, and the
    exit code is that of the first failure (0 when every image was answered).
    """
    config = parse_args(argv)
    try:
        outcome = classify(config)
    except ClientError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return int(exc.exit_code)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    if outcome.results or config.json_output:
        print((format_json if config.json_output else format_text)(outcome, config))
    for failure in outcome.failures:
        print(f"error: {failure.message}", file=sys.stderr)
    return int(outcome.failures[0].exit_code) if outcome.failures else int(ExitCode.OK)


if __name__ == "__main__":
    sys.exit(main())
