"""The Ray Serve deployment: both front doors (gRPC and REST) on one batching replica.

gRPC methods are named like TF Serving's RPCs (Serve routes by method name) and get raw
request bytes (see ``ray_app.grpc_servicers``). REST requests under ``/v1/`` go to one route
that dispatches on TF Serving's own URL patterns (``ray_app.rest_api.route``). The Open Inference
Protocol (KServe v2 / Triton) is a third adapter on the same ports: its gRPC methods
(``ray_app.oip_grpc``) and ``/v2`` routes (``ray_app.oip_rest``). All delegate to one
``Predictor``; errors map through one table (``ray_app.protocol.status``).

Authentication (``ray_app.auth``, when ``AppConfig.auth.token_file`` is set) is one check per
protocol that every route goes through: gRPC methods through ``MnistServer._grpc`` (a new gRPC
method must call it), HTTP routes through ``BearerTokenMiddleware`` on ``http_app`` (every path
but the web page's, new routes included).
"""

import asyncio
import logging
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, Response
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from ray_app import auth
from ray_app.metrics import AppMetrics
from ray_app.protocol.names import MODEL_VERSION_HEADER
from ray_app.protocol.status import (
    ResourceExhaustedError,
    ServingError,
    UnauthenticatedError,
    UnimplementedError,
    to_status,
)

logger = logging.getLogger("ray.serve")

http_app = FastAPI(title="MNIST on Ray Serve (TF Serving REST API)", docs_url=None, redoc_url=None)
http_app.add_middleware(auth.BearerTokenMiddleware)  # every HTTP route but the page's (ray_app.auth)

GRPC_MESSAGE_LIMIT = 1024  # TF Serving cuts gRPC error messages here (grpc_status_util.cc)
# libevent's own page, which TF Serving answers for paths outside /v1/.
NOT_FOUND_PAGE = (
    "<HTML><HEAD>\n<TITLE>404 Not Found</TITLE>\n</HEAD><BODY>\n<H1>Not Found</H1>\n</BODY></HTML>\n"
)
_JSON = "application/json"
_METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]


def _log_unexpected(exc: BaseException) -> None:
    if not isinstance(exc, ServingError):
        logger.error("request failed", exc_info=exc)


def _retry_after(exc: BaseException) -> str | None:
    """The Retry-After of a refusal that waiting cures (a full in-flight budget), else None."""
    seconds = getattr(exc, "retry_after_s", None) if isinstance(exc, ResourceExhaustedError) else None
    return None if seconds is None else str(seconds)


def _error_response(exc: BaseException) -> Response:
    from ray_app.rest_api import error_json

    _log_unexpected(exc)
    _, status, message = to_status(exc)
    retry_after = _retry_after(exc)
    headers = {"Retry-After": retry_after} if retry_after is not None else None
    return Response(error_json(message), status_code=status, media_type=_JSON, headers=headers)


def _grpc_fail(exc: BaseException, grpc_context: Any) -> None:
    import grpc

    _log_unexpected(exc)
    code, _, message = to_status(exc)
    if len(message) > GRPC_MESSAGE_LIMIT:
        message = message[:GRPC_MESSAGE_LIMIT] + "...TRUNCATED"
    grpc_context.set_code(getattr(grpc.StatusCode, code.value))
    grpc_context.set_details(message)
    retry_after = _retry_after(exc)
    if retry_after is not None:  # keep what Serve set (its request_id), add ours
        kept = list(getattr(grpc_context, "_trailing_metadata", None) or [])
        grpc_context.set_trailing_metadata([*kept, ("retry-after", retry_after)])


OIP_GRPC, OIP_REST = "oip_grpc", "oip_rest"  # the Open Inference Protocol's `protocol` metric tag


def _tf_serving_spec(result: Any) -> tuple[int | None, str]:
    """(version, signature) of a TF Serving answer, from its ``model_spec`` (None, "" without one)."""
    spec = getattr(result, "model_spec", None)
    version = spec.version.value if spec is not None and spec.HasField("version") else None
    return version, spec.signature_name if spec is not None else ""


def _oip_signature(predictor: Any, method: str, result: Any) -> str:
    """The signature an answered OIP infer ran (its model name says it; see ray_app.oip_api)."""
    from ray_app import oip_api

    return oip_api.split_name(predictor, result.model_name) if method == "ModelInfer" else ""


def _path_and_query(request: Request) -> str:
    """The raw (undecoded) path plus ``?query``: what TF Serving matches its URL patterns on."""
    raw = request.scope.get("raw_path") or request.url.path.encode()
    query = request.scope.get("query_string") or b""
    return raw.decode("latin-1") + ("?" + query.decode("latin-1") if query else "")


def _no_reload(predictor: Any, raw: bytes) -> None:
    raise UnimplementedError(
        "HandleReloadConfigRequest is not supported: models are configured by the Serve config "
        "(`serve deploy`), and new versions are picked up from the model store"
    )


@http_app.exception_handler(StarletteHTTPException)
async def _not_found(request: Request, exc: StarletteHTTPException) -> Response:
    if exc.status_code == 404:
        return HTMLResponse(NOT_FOUND_PAGE, status_code=404, media_type="text/html; charset=ISO-8859-1")
    return Response(exc.detail or "", status_code=exc.status_code)


@serve.deployment(name="MnistServer")
@serve.ingress(http_app)
class MnistServer:
    """One replica: a backend (embedded TF / TF Serving child / remote) behind a batcher."""

    async def __init__(self, config: dict[str, Any]) -> None:
        from ray_app.backends import make_backend
        from ray_app.config import AppConfig
        from ray_app.predictor import Predictor

        app_config = AppConfig.model_validate(config)
        self._metrics = AppMetrics(app_config.model_name)
        self._auth = None
        if app_config.auth.token_file:
            self._auth = auth.TokenAuth(
                app_config.auth.token_file, app_config.auth.reload_interval_s, self._metrics.auth_refused
            )
        auth.install(self._auth)
        self._backend = make_backend(app_config)
        self._backend.observer = self._metrics
        await self._backend.start()
        self._predictor = Predictor(app_config, self._backend, metrics=self._metrics)
        logger.info(
            "serving %r from %s with the %s backend; versions %s",
            app_config.model_name,
            app_config.model_base_path,
            self._backend.kind,
            self._backend.versions() or "none yet (waiting for the first one)",
        )

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        from ray_app.config import LiveConfig

        live = LiveConfig.model_validate(user_config or {})
        self._predictor.reconfigure(live)
        self._metrics.canary_percent(live.canary_traffic_percent)

    async def check_health(self) -> None:
        """Serve calls this every health_check_period_s: also when the gauges are refreshed (Ray
        exports a gauge only after it is set, see ray_app/metrics.py)."""
        self._metrics.versions({v: s.state for v, s in self._backend.version_states().items()})
        self._metrics.canary_percent(self._predictor.live.canary_traffic_percent)
        self._metrics.flush()
        problem = self._backend.health_problem()
        if problem:
            raise RuntimeError(problem)

    async def __del__(self) -> None:
        self._predictor.close()
        await self._backend.stop()

    # -- gRPC: tensorflow.serving.PredictionService / ModelService --------------------------------
    def _observe(
        self, protocol: str, method: str, started_s: float, outcome: Any, version=None, signature=""
    ):
        """One request into the metrics: its status code (from the error, if ``outcome`` is one)."""
        code = to_status(outcome)[0].value if isinstance(outcome, BaseException) else "OK"
        if isinstance(outcome, ResourceExhaustedError) and outcome.limit:
            self._metrics.rejected(outcome.limit)
        latency_ms = (time.perf_counter() - started_s) * 1000
        self._metrics.request(protocol, method, code, latency_ms, version, signature)

    async def _grpc(
        self,
        method: str,
        handler,
        raw: bytes,
        grpc_context: Any,
        empty,
        protocol: str = "grpc",
        describe=None,
    ):
        """Every gRPC method of every protocol goes through here: the token check, the handler,
        errors and metrics. ``describe(result)`` gives the (version, signature) to record
        (default: the answer's ``model_spec``, as in TF Serving's messages)."""
        started_s = time.perf_counter()
        if self._auth is not None:
            header = auth.grpc_authorization(grpc_context.invocation_metadata())
            why = self._auth.refusal(header, "grpc")
            if why is not None:
                refused = UnauthenticatedError(auth.MESSAGES[why])
                _grpc_fail(refused, grpc_context)
                self._observe(protocol, method, started_s, refused)
                return empty()
        try:
            with self._predictor.inflight_bytes.hold(len(raw)):  # before the message is parsed
                result = handler(self._predictor, raw)
                if hasattr(result, "__await__"):
                    result = await result
        except Exception as exc:
            _grpc_fail(exc, grpc_context)
            self._observe(protocol, method, started_s, exc)
            return empty()
        version, signature = (describe or _tf_serving_spec)(result)
        self._observe(protocol, method, started_s, result, version, signature)
        return result

    async def Predict(self, request: bytes, grpc_context: Any):  # noqa: N802
        import functools

        from ray_app import deadlines, grpc_api
        from ray_app.protocol.protos import predict_pb2

        deadline_s = deadlines.grpc_deadline_s(grpc_context, self._predictor.config.request_timeout_s)
        handler = functools.partial(grpc_api.predict, deadline_s=deadline_s)
        return await self._grpc("Predict", handler, request, grpc_context, predict_pb2.PredictResponse)

    async def GetModelMetadata(self, request: bytes, grpc_context: Any):  # noqa: N802
        from ray_app import grpc_api
        from ray_app.protocol.protos import get_model_metadata_pb2

        empty = get_model_metadata_pb2.GetModelMetadataResponse
        return await self._grpc("GetModelMetadata", grpc_api.get_model_metadata, request, grpc_context, empty)

    async def GetModelStatus(self, request: bytes, grpc_context: Any):  # noqa: N802
        from ray_app import grpc_api
        from ray_app.protocol.protos import get_model_status_pb2

        empty = get_model_status_pb2.GetModelStatusResponse
        return await self._grpc("GetModelStatus", grpc_api.get_model_status, request, grpc_context, empty)

    async def Classify(self, request: bytes, grpc_context: Any):  # noqa: N802
        from ray_app import grpc_api
        from ray_app.protocol.protos import classification_pb2

        empty = classification_pb2.ClassificationResponse
        return await self._grpc("Classify", grpc_api.classify, request, grpc_context, empty)

    async def Regress(self, request: bytes, grpc_context: Any):  # noqa: N802
        from ray_app import grpc_api
        from ray_app.protocol.protos import regression_pb2

        return await self._grpc(
            "Regress", grpc_api.regress, request, grpc_context, regression_pb2.RegressionResponse
        )

    async def MultiInference(self, request: bytes, grpc_context: Any):  # noqa: N802
        from ray_app import grpc_api
        from ray_app.protocol.protos import inference_pb2

        empty = inference_pb2.MultiInferenceResponse
        return await self._grpc("MultiInference", grpc_api.multi_inference, request, grpc_context, empty)

    async def HandleReloadConfigRequest(self, request: bytes, grpc_context: Any):  # noqa: N802
        from ray_app.protocol.protos import model_management_pb2

        empty = model_management_pb2.ReloadConfigResponse
        return await self._grpc("HandleReloadConfigRequest", _no_reload, request, grpc_context, empty)

    # -- gRPC: inference.GRPCInferenceService (Open Inference Protocol; see ray_app.oip_grpc) -------
    async def _oip_grpc(self, method: str, raw: bytes, grpc_context: Any):
        from ray_app import oip_grpc

        handler, _ = oip_grpc.METHODS[method]

        def describe(result: Any) -> tuple[int | None, str]:
            version = int(result.model_version) if method == "ModelInfer" else None
            return version, _oip_signature(self._predictor, method, result)

        return await self._grpc(
            method,
            handler,
            raw,
            grpc_context,
            lambda: oip_grpc.empty_response(method),
            protocol=OIP_GRPC,
            describe=describe,
        )

    async def ServerLive(self, request: bytes, grpc_context: Any):  # noqa: N802
        return await self._oip_grpc("ServerLive", request, grpc_context)

    async def ServerReady(self, request: bytes, grpc_context: Any):  # noqa: N802
        return await self._oip_grpc("ServerReady", request, grpc_context)

    async def ModelReady(self, request: bytes, grpc_context: Any):  # noqa: N802
        return await self._oip_grpc("ModelReady", request, grpc_context)

    async def ServerMetadata(self, request: bytes, grpc_context: Any):  # noqa: N802
        return await self._oip_grpc("ServerMetadata", request, grpc_context)

    async def ModelMetadata(self, request: bytes, grpc_context: Any):  # noqa: N802
        return await self._oip_grpc("ModelMetadata", request, grpc_context)

    async def ModelInfer(self, request: bytes, grpc_context: Any):  # noqa: N802
        return await self._oip_grpc("ModelInfer", request, grpc_context)

    # -- REST: TF Serving's HTTP API ---------------------------------------------------------------
    @http_app.api_route("/v1/{path:path}", methods=_METHODS)
    async def rest_v1(self, request: Request, path: str) -> Response:
        from ray_app import deadlines, request_body, rest_api, uploads

        started_s, method = time.perf_counter(), "unknown"
        deadline_s = deadlines.http_deadline_s(request.headers, self._predictor.config.request_timeout_s)
        try:
            where = rest_api.route(request.method, _path_and_query(request))
            method = where.kind
            if where.kind == "status":
                answer = Response(rest_api.status(self._predictor, where), media_type=_JSON)
                self._observe("rest", method, started_s, answer)
                return answer
            if where.kind == "metadata":
                answer = Response(rest_api.metadata(self._predictor, where), media_type=_JSON)
                self._observe("rest", method, started_s, answer)
                return answer
            limit = self._predictor.config.limits.max_request_bytes
            with self._predictor.inflight_bytes.hold(request_body.reserved_bytes(request.headers, limit)):
                if where.kind == "predict" and uploads.is_multipart(request.headers.get("content-type")):
                    text, version, signature = await self._upload_predict(request, where, deadline_s)
                else:
                    body = await request_body.read_body(request.headers, request.stream(), limit)
                    if where.kind != "predict":
                        rest_api.examples_request(self._predictor, where, body)
                    text, version, signature = await rest_api.predict(
                        self._predictor, where, body, deadline_s
                    )
        except Exception as exc:
            self._observe("rest", method, started_s, exc)
            return _error_response(exc)
        self._observe("rest", method, started_s, text, version, signature)
        return Response(text, media_type=_JSON, headers={MODEL_VERSION_HEADER: str(version)})

    async def _upload_predict(self, request: Request, where: Any, deadline_s: float) -> tuple[str, int, str]:
        """Multipart image files -> ``predict_image_bytes`` (our addition; see ``ray_app.uploads``)."""
        from ray_app import rest_api, uploads

        self._predictor.check_model(where.model_name)  # before reading the body
        images = await uploads.read_images(request.headers, request.stream(), self._predictor.config.limits)
        result = await self._predictor.predict(
            uploads.image_request(where.model_name, images, where.version, where.label), deadline_s=deadline_s
        )
        return rest_api.to_json(result, rows=True), result.version, result.signature_name

    # -- REST: the Open Inference Protocol's /v2 API (ray_app.oip_rest) -------------------------------
    @http_app.api_route("/v2", methods=_METHODS, include_in_schema=False)
    @http_app.api_route("/v2/{path:path}", methods=_METHODS, include_in_schema=False)
    async def rest_v2(self, request: Request) -> Response:
        from ray_app import oip_rest

        started_s = time.perf_counter()
        raw_path = (request.scope.get("raw_path") or request.url.path.encode()).decode("latin-1")
        answer = await oip_rest.handle(
            self._predictor, request.method, raw_path, request.headers, request.stream()
        )
        if answer.error is not None:
            _log_unexpected(answer.error)
        outcome = answer.error if answer.error is not None else answer
        self._observe(OIP_REST, answer.method, started_s, outcome, answer.version, answer.signature)
        return Response(
            answer.body, status_code=answer.status, media_type=answer.media_type, headers=answer.headers
        )

    # -- the web page and its panel data (ours, outside TF Serving's API; see ray_app.web) ----------
    @http_app.get("/", include_in_schema=False)
    async def web_page(self, request: Request) -> Response:
        from ray_app import web

        return web.page_response(
            request.scope.get("root_path", ""),
            self._predictor.config.model_name,
            request.headers.get("if-none-match"),
        )

    @http_app.get("/static/{file_name}", include_in_schema=False)
    async def web_static(self, request: Request, file_name: str) -> Response:
        from ray_app import web

        return web.static_response(file_name, request.headers.get("if-none-match"))

    @http_app.get("/api/models/{name}")
    async def web_models(self, name: str) -> Response:
        import json

        from ray_app import web

        try:
            # in a thread: the first read of a version's metrics.json is a (shared) file-system read
            summary = await asyncio.to_thread(web.models_summary, self._predictor, name)
            return Response(json.dumps(summary), media_type=_JSON)
        except Exception as exc:
            return _error_response(exc)
