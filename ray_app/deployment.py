"""The Ray Serve deployment: both front doors (gRPC and REST) on one batching replica.

gRPC methods are named like TF Serving's RPCs (the proxy routes by method name) and get
raw request bytes (see ``ray_app.grpc_servicers``). REST routes are FastAPI routes on
TF Serving's paths. Both delegate to one ``Predictor``; errors map through one table.
"""

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve

from ray_app.errors import ServingError, UnimplementedError, to_status
from ray_app.signatures import MODEL_VERSION_HEADER

logger = logging.getLogger("ray.serve")

http_app = FastAPI(title="MNIST on Ray Serve (TF Serving REST API)")


def _error_response(exc: BaseException) -> JSONResponse:
    _, status, message = to_status(exc)
    if not isinstance(exc, ServingError):
        logger.exception("request failed", exc_info=exc)
    return JSONResponse({"error": message}, status_code=status)


def _grpc_fail(exc: BaseException, grpc_context: Any) -> None:
    import grpc

    code, _, message = to_status(exc)
    if not isinstance(exc, ServingError):
        logger.exception("request failed", exc_info=exc)
    grpc_context.set_code(getattr(grpc.StatusCode, code.value))
    grpc_context.set_details(message)


def _version(value: str | None) -> int | None:
    from ray_app.errors import InvalidArgumentError

    if value is None:
        return None
    if not value.isdigit() or int(value) < 1:
        raise InvalidArgumentError(f"version must be a positive integer, got {value!r}")
    return int(value)


@serve.deployment(name="MnistServer")
@serve.ingress(http_app)
class MnistServer:
    """One replica: a backend (embedded TF / TF Serving child / remote) behind a batcher."""

    async def __init__(self, config: dict[str, Any]) -> None:
        from ray_app.backends import make_backend
        from ray_app.config import AppConfig
        from ray_app.predictor import Predictor

        app_config = AppConfig.model_validate(config)
        self._backend = make_backend(app_config)
        await self._backend.start()
        self._predictor = Predictor(app_config, self._backend)
        logger.info(
            "serving %r from %s with the %s backend; versions %s",
            app_config.model_name,
            app_config.model_base_path,
            self._backend.kind,
            self._backend.versions(),
        )

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        from ray_app.config import LiveConfig

        self._predictor.reconfigure(LiveConfig.model_validate(user_config or {}))

    async def check_health(self) -> None:
        problem = self._backend.health_problem()
        if problem:
            raise RuntimeError(problem)

    async def __del__(self) -> None:
        await self._backend.stop()

    # -- gRPC: tensorflow.serving.PredictionService / ModelService --------------------------------
    async def _grpc(self, handler, raw: bytes, grpc_context: Any, empty):
        try:
            result = handler(self._predictor, raw)
            if hasattr(result, "__await__"):
                result = await result
            return result
        except Exception as exc:
            _grpc_fail(exc, grpc_context)
            return empty()

    async def Predict(self, request: bytes, grpc_context: Any):  # noqa: N802
        from tensorflow_serving.apis import predict_pb2

        from ray_app import grpc_api

        return await self._grpc(grpc_api.predict, request, grpc_context, predict_pb2.PredictResponse)

    async def GetModelMetadata(self, request: bytes, grpc_context: Any):  # noqa: N802
        from tensorflow_serving.apis import get_model_metadata_pb2

        from ray_app import grpc_api

        return await self._grpc(
            grpc_api.get_model_metadata,
            request,
            grpc_context,
            get_model_metadata_pb2.GetModelMetadataResponse,
        )

    async def GetModelStatus(self, request: bytes, grpc_context: Any):  # noqa: N802
        from tensorflow_serving.apis import get_model_status_pb2

        from ray_app import grpc_api

        return await self._grpc(
            grpc_api.get_model_status, request, grpc_context, get_model_status_pb2.GetModelStatusResponse
        )

    async def _unimplemented(self, method: str, grpc_context: Any, empty):
        message = f"{method} is not implemented by this server; use Predict (signature 'serving_default')"
        _grpc_fail(UnimplementedError(message), grpc_context)
        return empty()

    async def Classify(self, request: bytes, grpc_context: Any):  # noqa: N802
        from tensorflow_serving.apis import classification_pb2

        return await self._unimplemented("Classify", grpc_context, classification_pb2.ClassificationResponse)

    async def Regress(self, request: bytes, grpc_context: Any):  # noqa: N802
        from tensorflow_serving.apis import regression_pb2

        return await self._unimplemented("Regress", grpc_context, regression_pb2.RegressionResponse)

    async def MultiInference(self, request: bytes, grpc_context: Any):  # noqa: N802
        from tensorflow_serving.apis import inference_pb2

        return await self._unimplemented("MultiInference", grpc_context, inference_pb2.MultiInferenceResponse)

    async def HandleReloadConfigRequest(self, request: bytes, grpc_context: Any):  # noqa: N802
        from tensorflow_serving.apis import model_management_pb2

        return await self._unimplemented(
            "HandleReloadConfigRequest (configure models through the Serve config)",
            grpc_context,
            model_management_pb2.ReloadConfigResponse,
        )

    # -- REST: TF Serving's HTTP API ---------------------------------------------------------------
    async def _rest(self, fn, *args) -> JSONResponse:
        try:
            result = fn(*args)
            if hasattr(result, "__await__"):
                result = await result
            return JSONResponse(result)
        except Exception as exc:
            return _error_response(exc)

    async def _rest_predict(self, request: Request, name: str, version: str | None, label: str | None):
        from ray_app import rest_api, uploads

        if uploads.is_multipart(request.headers.get("content-type")):
            return await self._upload_predict(request, name, version, label)
        try:
            limits = self._predictor.config.limits
            body = rest_api.parse_body(await request.body(), limits.max_request_bytes)
            inference, rows = rest_api.to_inference_request(
                self._predictor, name, _version(version), label, body
            )
            result = await self._predictor.predict(inference)
            return JSONResponse(
                rest_api.to_response(result, rows), headers={MODEL_VERSION_HEADER: str(result.version)}
            )
        except Exception as exc:
            return _error_response(exc)

    async def _upload_predict(self, request: Request, name: str, version: str | None, label: str | None):
        """Multipart image files -> ``predict_image_bytes`` (our addition; see ``ray_app.uploads``)."""
        from ray_app import rest_api, uploads

        try:
            pinned = _version(version)
            self._predictor.check_model(name)  # before reading the body
            images = await uploads.read_images(
                request.headers, request.stream(), self._predictor.config.limits
            )
            result = await self._predictor.predict(uploads.image_request(name, images, pinned, label))
            return JSONResponse(
                rest_api.to_response(result, rows=True), headers={MODEL_VERSION_HEADER: str(result.version)}
            )
        except Exception as exc:
            return _error_response(exc)

    @http_app.post("/v1/models/{name}:predict")
    async def predict_latest(self, request: Request, name: str):
        return await self._rest_predict(request, name, None, None)

    @http_app.post("/v1/models/{name}/versions/{version}:predict")
    async def predict_version(self, request: Request, name: str, version: str):
        return await self._rest_predict(request, name, version, None)

    @http_app.post("/v1/models/{name}/labels/{label}:predict")
    async def predict_label(self, request: Request, name: str, label: str):
        return await self._rest_predict(request, name, None, label)

    @http_app.get("/v1/models/{name}")
    async def status_latest(self, name: str):
        from ray_app import rest_api

        return await self._rest(rest_api.model_status, self._predictor, name, None, None)

    @http_app.get("/v1/models/{name}/versions/{version}")
    async def status_version(self, name: str, version: str):
        from ray_app import rest_api

        return await self._rest(lambda: rest_api.model_status(self._predictor, name, _version(version), None))

    @http_app.get("/v1/models/{name}/labels/{label}")
    async def status_label(self, name: str, label: str):
        from ray_app import rest_api

        return await self._rest(rest_api.model_status, self._predictor, name, None, label)

    @http_app.get("/v1/models/{name}/metadata")
    async def metadata_latest(self, name: str):
        from ray_app import rest_api

        return await self._rest(rest_api.model_metadata, self._predictor, name, None, None)

    @http_app.get("/v1/models/{name}/versions/{version}/metadata")
    async def metadata_version(self, name: str, version: str):
        from ray_app import rest_api

        return await self._rest(
            lambda: rest_api.model_metadata(self._predictor, name, _version(version), None)
        )

    @http_app.get("/v1/models/{name}/labels/{label}/metadata")
    async def metadata_label(self, name: str, label: str):
        from ray_app import rest_api

        return await self._rest(rest_api.model_metadata, self._predictor, name, None, label)

    # -- the web page and its panel data (ours, outside TF Serving's API; see ray_app.web) ----------
    @http_app.get("/", include_in_schema=False)
    async def web_page(self, request: Request):
        from ray_app import web

        return web.page_response(
            request.scope.get("root_path", ""),
            self._predictor.config.model_name,
            request.headers.get("if-none-match"),
        )

    @http_app.get("/static/{file_name}", include_in_schema=False)
    async def web_static(self, request: Request, file_name: str):
        from ray_app import web

        return web.static_response(file_name, request.headers.get("if-none-match"))

    @http_app.get("/api/models/{name}")
    async def web_models(self, name: str):
        from ray_app import web

        return await self._rest(web.models_summary, self._predictor, name)
