"""Sending Predict calls with a deadline, over gRPC or TF Serving's REST API.

Both transports take a :class:`client.messages.ModelTarget` and :class:`client.messages.Batch`
and return :class:`client.messages.Predictions`; every failure becomes a
:class:`client.errors.ClientError` naming the server and the problem.
"""

from __future__ import annotations

import http.client
import json
import ssl
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import grpc

from client.errors import ClientError, DeadlineError, ExitCode, UnreachableError, one_line, status_error
from client.messages import (
    Batch,
    ModelTarget,
    Predictions,
    parse_predict_response,
    parse_rest_response,
    predict_request,
    rest_body,
    rest_path,
)
from ray_app.protocol.names import MODEL_VERSION_HEADER
from ray_app.protocol.protos import predict_pb2
from ray_app.protocol.status import HTTP_TO_GRPC

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
_PREDICT_METHOD = "/tensorflow.serving.PredictionService/Predict"
# What grpc's UNAVAILABLE details say when no connection could be made (vs. a server that
# answered UNAVAILABLE itself, e.g. while no model version is loaded).
_CONNECT_FAILURES = ("failed to connect", "connection refused", "dns resolution failed", "ssl", "handshake")


class Transport(Protocol):
    def predict(self, target: ModelTarget, batch: Batch) -> Predictions: ...

    def close(self) -> None: ...


def _read_pem(path: Path | None, what: str = "CA certificate") -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ClientError(
            f"cannot read {what} {path}: {exc.strerror or exc}", exit_code=ExitCode.USAGE
        ) from None


class ClientCertificate(NamedTuple):
    """A PEM certificate (chain) and its key, for servers that ask for one (mutual TLS)."""

    cert: Path
    key: Path


class GrpcTransport:
    """TF Serving's ``PredictionService.Predict`` over one channel (TLS optional)."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        timeout_s: float,
        tls: bool = False,
        ca_cert: Path | None = None,
        token: str | None = None,
        client_cert: ClientCertificate | None = None,
    ) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.address = f"{host}:{port}"
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        self.timeout_s = timeout_s
        options = [
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ]
        if tls or ca_cert is not None or client_cert is not None:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=_read_pem(ca_cert),
                private_key=_read_pem(client_cert.key, "client key") if client_cert else None,
                certificate_chain=_read_pem(client_cert.cert, "client certificate") if client_cert else None,
            )
            self._channel = grpc.secure_channel(self.address, credentials, options=options)
        else:
            self._channel = grpc.insecure_channel(self.address, options=options)
        # Raw method path: the PredictionService stub module would add nothing but an import.
        self._predict = self._channel.unary_unary(
            _PREDICT_METHOD,
            request_serializer=lambda message: message.SerializeToString(),
            response_deserializer=predict_pb2.PredictResponse.FromString,
        )

    def predict(self, target: ModelTarget, batch: Batch) -> Predictions:
        request = predict_request(target, batch)
        try:
            response = self._predict(request, timeout=self.timeout_s, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise self._error(exc) from None
        return parse_predict_response(response, expected=len(batch))

    def _error(self, exc: grpc.RpcError) -> ClientError:
        code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
        details = (exc.details() if hasattr(exc, "details") else "") or ""
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return DeadlineError(f"no answer from {self.address} within {self.timeout_s:g} s (--timeout-s)")
        if code == grpc.StatusCode.UNAVAILABLE and any(s in details.lower() for s in _CONNECT_FAILURES):
            return UnreachableError(f"cannot reach {self.address} (gRPC): {_first_line(details)}")
        return status_error(code.name, f"{details} ({self.address})")

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> GrpcTransport:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class RestTransport:
    """TF Serving's REST ``POST /v1/models/...:predict`` (HTTPS with ``tls``).

    The deadline covers the whole call: urllib's own timeout bounds each socket operation only,
    so the call runs in a daemon thread that is given up on at the deadline (a server dripping
    bytes cannot stretch it; the abandoned thread ends at its next socket timeout).
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        timeout_s: float,
        tls: bool = False,
        ca_cert: Path | None = None,
        token: str | None = None,
        client_cert: ClientCertificate | None = None,
    ) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self._headers = {"Content-Type": "application/json"}
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        scheme = "https" if tls or ca_cert is not None or client_cert is not None else "http"
        self.base_url = f"{scheme}://{host}:{port}"
        self.timeout_s = timeout_s
        self._context = None
        if scheme == "https":
            try:
                self._context = ssl.create_default_context(cafile=str(ca_cert) if ca_cert else None)
            except (ssl.SSLError, OSError) as exc:
                raise ClientError(
                    f"cannot use CA certificate {ca_cert}: {getattr(exc, 'strerror', None) or exc}",
                    exit_code=ExitCode.USAGE,
                ) from None
            if client_cert is not None:
                try:
                    self._context.load_cert_chain(str(client_cert.cert), str(client_cert.key))
                except (ssl.SSLError, OSError) as exc:
                    raise ClientError(
                        f"cannot use client certificate {client_cert.cert} / key {client_cert.key}: "
                        f"{getattr(exc, 'strerror', None) or exc}",
                        exit_code=ExitCode.USAGE,
                    ) from None

    def predict(self, target: ModelTarget, batch: Batch) -> Predictions:
        url = self.base_url + rest_path(target)
        request = urllib.request.Request(
            url, data=json.dumps(rest_body(batch)).encode(), method="POST", headers=self._headers,
        )  # fmt: skip
        outcome: dict[str, Any] = {}

        def call() -> None:
            try:
                with urllib.request.urlopen(
                    request, timeout=self.timeout_s, context=self._context
                ) as response:
                    outcome["raw"] = response.read()
                    outcome["version"] = response.headers.get(MODEL_VERSION_HEADER)
            except BaseException as exc:  # handed to the caller's thread below
                outcome["error"] = exc

        worker = threading.Thread(target=call, name="rest-predict", daemon=True)
        worker.start()
        worker.join(self.timeout_s)
        if worker.is_alive():
            raise self._deadline()
        if "error" in outcome:
            raise self._error(outcome["error"]) from None
        try:
            body = json.loads(outcome["raw"])
        except ValueError:
            raise ClientError(f"malformed response from {url}: not JSON") from None
        header = outcome["version"]
        version = int(header) if header and header.isdigit() else None
        return parse_rest_response(body, expected=len(batch), version=version)

    def _error(self, exc: BaseException) -> ClientError:
        if isinstance(exc, urllib.error.HTTPError):
            return self._http_error(exc)
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        if isinstance(reason, TimeoutError):
            return self._deadline()
        if isinstance(reason, http.client.HTTPException):  # a peer that does not speak HTTP
            return UnreachableError(
                f"cannot talk HTTP to {self.base_url}: {type(reason).__name__} {_first_line(str(reason))}"
            )
        if isinstance(reason, OSError | ssl.SSLError | urllib.error.URLError):
            return UnreachableError(f"cannot reach {self.base_url} (HTTP): {_first_line(str(reason))}")
        return ClientError(
            f"request to {self.base_url} failed: {type(exc).__name__}: {_first_line(str(exc))}"
        )

    def _deadline(self) -> DeadlineError:
        return DeadlineError(f"no answer from {self.base_url} within {self.timeout_s:g} s (--timeout-s)")

    def _http_error(self, exc: urllib.error.HTTPError) -> ClientError:
        try:
            message = json.loads(exc.read()).get("error", "")
        except (ValueError, AttributeError, OSError, http.client.HTTPException):
            message = ""
        code = HTTP_TO_GRPC.get(exc.code)
        name = code.value if code is not None else f"HTTP {exc.code}"
        return status_error(name, f"{message or exc.reason} (HTTP {exc.code}, {self.base_url})")

    def close(self) -> None:
        pass

    def __enter__(self) -> RestTransport:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _first_line(text: object) -> str:
    return one_line(text, max_chars=300)
