"""The Ray Serve deployment: both front doors (gRPC and REST) on one batching replica.

gRPC methods are named like TF Serving's RPCs (Serve routes by method name), get raw request
bytes (see ``ray_app.grpc_servicers``) and look up their handler in one table
(``ray_app.grpc_methods``). REST requests under ``/v1/`` go to one route that dispatches on TF
Serving's own URL patterns (``ray_app.rest_routes.route``). The Open Inference
Protocol (KServe v2 / Triton) is a third adapter on the same ports: its gRPC methods
(``ray_app.oip_grpc``) and ``/v2`` routes (``ray_app.oip_rest``). All delegate to one
``Predictor``; errors map through one table (``ray_app.protocol.status``).

Authentication (``ray_app.auth``, when ``AppConfig.auth.token_file`` is set) is one check per
protocol that every route goes through: gRPC methods through ``MnistServer._grpc`` (a new gRPC
method must call it), HTTP routes through ``BearerTokenMiddleware`` on ``http_app`` (every path
but the web page's, new routes included).
"""

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, Response
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from ray_app import (
    auth,
    deadlines,
    grpc_methods,
    oip_rest,
    request_body,
    rest_api,
    rest_bodies,
    rest_routes,
    uploads,
    web,
)
from ray_app.backends import make_backend
from ray_app.config import AppConfig, LiveConfig
from ray_app.metrics import AppMetrics
from ray_app.predictor import Predictor
from ray_app.protocol.names import MODEL_VERSION_HEADER
from ray_app.protocol.status import (
    ResourceExhaustedError,
    ServingError,
    UnauthenticatedError,
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
    _log_unexpected(exc)
    _, status, message = to_status(exc)
    retry_after = _retry_after(exc)
    headers = {"Retry-After": retry_after} if retry_after is not None else None
    return Response(rest_bodies.error_json(message), status_code=status, media_type=_JSON, headers=headers)


def _grpc_fail(exc: BaseException, grpc_context: Any) -> None:
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


OIP_REST = "oip_rest"  # the Open Inference Protocol's `protocol` metric tag over HTTP


def _path_and_query(request: Request) -> str:
    """The raw (undecoded) path plus ``?query``: what TF Serving matches its URL patterns on."""
    raw = request.scope.get("raw_path") or request.url.path.encode()
    query = request.scope.get("query_string") or b""
    return raw.decode("latin-1") + ("?" + query.decode("latin-1") if query else "")


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
        self._predictor.start_offloading()
        logger.info(
            "serving %r from %s with the %s backend; versions %s",
            app_config.model_name,
            app_config.model_base_path,
            self._backend.kind,
            self._backend.versions() or "none yet (waiting for the first one)",
        )

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
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

    async def _grpc(self, method: str, raw: bytes, grpc_context: Any):
        """Every gRPC method of every protocol goes through here (``ray_app.grpc_methods``): the
        token check, the handler, errors and metrics."""
        started_s = time.perf_counter()
        spec = grpc_methods.METHODS[method]
        if self._auth is not None:
            header = auth.grpc_authorization(grpc_context.invocation_metadata())
            why = self._auth.refusal(header, "grpc")
            if why is not None:
                refused = UnauthenticatedError(auth.MESSAGES[why])
                _grpc_fail(refused, grpc_context)
                self._observe(spec.protocol, method, started_s, refused)
                return spec.empty()
        deadline_s = deadlines.grpc_deadline_s(grpc_context, self._predictor.config.request_timeout_s)
        try:
            with self._predictor.inflight_bytes.hold(len(raw)):  # before the message is parsed
                result = await spec.handle(self._predictor, raw, deadline_s)
        except Exception as exc:
            _grpc_fail(exc, grpc_context)
            self._observe(spec.protocol, method, started_s, exc)
            return spec.empty()
        version, signature = spec.describe(self._predictor, result)
        self._observe(spec.protocol, method, started_s, result, version, signature)
        return result

    # One method per gRPC method name (Serve routes by name), all through _grpc.
    # tensorflow.serving.PredictionService / ModelService
    async def Predict(self, request: bytes, grpc_context: Any):  # noqa: N802
        return await self._grpc("Predict", request, grpc_context)

    async def GetModelMetadata(self, request: bytes, grpc_context: Any):  # noqa: N802
        return await self._grpc("GetModelMetadata", request, grpc_context)

    async def GetModelStatus(self, request: bytes, grpc_context: Any):  # noqa: N802
        return await self._grpc("GetModelStatus", request, grpc_context)

    async def Classify(self, request: bytes, grpc_context: Any):  # noqa: N802
        return await self._grpc("Classify", request, grpc_context)

    async def Regress(self, request: bytes, grpc_context: Any):  # noqa: N802
        return await self._grpc("Regress", request, grpc_context)

    async def MultiInference(self, request: bytes, grpc_context: Any):  # noqa: N802
        return await self._grpc("MultiInference", request, grpc_context)

    async def HandleReloadConfigRequest(self, request: bytes, grpc_context: Any):  # noqa: N802
        return await self._grpc("HandleReloadConfigRequest", request, grpc_context)

    # inference.GRPCInferenceService (Open Inference Protocol)
    async def ServerLive(self, request: bytes, grpc_context: Any):  # noqa: N802
        return await self._grpc("ServerLive", request, grpc_context)

    async def ServerReady(self, request: bytes, grpc_context: Any):  # noqa: N802
        return await self._grpc("ServerReady", request, grpc_context)

    async def ModelReady(self, request: bytes, grpc_context: Any):  # noqa: N802
        return await self._grpc("ModelReady", request, grpc_context)

    async def ServerMetadata(self, request: bytes, grpc_context: Any):  # noqa: N802
        return await self._grpc("ServerMetadata", request, grpc_context)

    async def ModelMetadata(self, request: bytes, grpc_context: Any):  # noqa: N802
        return await self._grpc("ModelMetadata", request, grpc_context)

    async def ModelInfer(self, request: bytes, grpc_context: Any):  # noqa: N802
        return await self._grpc("ModelInfer", request, grpc_context)

    # -- REST: TF Serving's HTTP API ---------------------------------------------------------------
    @http_app.api_route("/v1/{path:path}", methods=_METHODS)
    async def rest_v1(self, request: Request, path: str) -> Response:
        started_s, method = time.perf_counter(), "unknown"
        deadline_s = deadlines.http_deadline_s(request.headers, self._predictor.config.request_timeout_s)
        try:
            where = rest_routes.route(request.method, _path_and_query(request))
            method = where.kind
            if where.kind == "status":
                answer = Response(rest_api.status(self._predictor, where), media_type=_JSON)
                self._observe("rest", method, started_s, answer)
                return answer
            if where.kind == "metadata":
                answer = Response(rest_api.metadata(self._predictor, where), media_type=_JSON)
                self._observe("rest", method, started_s, answer)
                return answer
            limit, budget = self._predictor.config.limits.max_request_bytes, self._predictor.inflight_bytes
            declared = request_body.declared_bytes(request.headers, limit)
            with budget.metered(request.stream(), declared) as stream:  # held as they arrive, not as declared
                if where.kind == "predict" and uploads.is_multipart(request.headers.get("content-type")):
                    text, version, signature = await self._upload_predict(request, where, stream, deadline_s)
                else:
                    body = await request_body.read_body(request.headers, stream, limit)
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

    async def _upload_predict(
        self, request: Request, where: Any, stream: AsyncIterator[bytes], deadline_s: float
    ) -> tuple[str, int, str]:
        """Multipart image files -> ``predict_image_bytes`` (our addition; see ``ray_app.uploads``)."""
        self._predictor.check_model(where.model_name)  # before reading the body
        images = await uploads.read_images(request.headers, stream, self._predictor.config.limits)
        result = await self._predictor.predict(
            uploads.image_request(where.model_name, images, where.version, where.label), deadline_s=deadline_s
        )
        return rest_bodies.to_json(result.outputs, rows=True), result.version, result.signature_name

    # -- REST: the Open Inference Protocol's /v2 API (ray_app.oip_rest) -------------------------------
    @http_app.api_route("/v2", methods=_METHODS, include_in_schema=False)
    @http_app.api_route("/v2/{path:path}", methods=_METHODS, include_in_schema=False)
    async def rest_v2(self, request: Request) -> Response:
        started_s = time.perf_counter()
        deadline_s = deadlines.http_deadline_s(request.headers, self._predictor.config.request_timeout_s)
        raw_path = (request.scope.get("raw_path") or request.url.path.encode()).decode("latin-1")
        declared = request_body.declared_or_zero(request.headers)  # a bad one: oip_rest's own error
        with self._predictor.inflight_bytes.metered(request.stream(), declared) as stream:
            answer = await oip_rest.handle(
                self._predictor, request.method, raw_path, request.headers, stream, deadline_s
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
        return web.page_response(
            request.scope.get("root_path", ""),
            self._predictor.config.model_name,
            request.headers.get("if-none-match"),
        )

    @http_app.get("/static/{file_name}", include_in_schema=False)
    async def web_static(self, request: Request, file_name: str) -> Response:
        return web.static_response(file_name, request.headers.get("if-none-match"))

    @http_app.get("/api/models/{name}")
    async def web_models(self, name: str) -> Response:
        try:
            # in a thread: the first read of a version's metrics.json is a (shared) file-system read
            summary = await asyncio.to_thread(web.models_summary, self._predictor, name)
            return Response(json.dumps(summary), media_type=_JSON)
        except Exception as exc:
            return _error_response(exc)
