"""Backend that forwards to a TF Serving ``PredictionService`` over gRPC (one batch, one Predict).

Loaded versions come from ``ModelService.GetModelStatus`` (polled), signatures from
``GetModelMetadata``. Every RPC carries a deadline (``backend_timeout_s``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping

import grpc
import numpy as np
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from ray_app.errors import UnavailableError, error_for_code
from ray_app.signatures import SignatureSpec, TensorSpec
from ray_app.tensors import from_ndarray, numpy_dtype, to_ndarray

logger = logging.getLogger("ray.serve")

_AVAILABLE = get_model_status_pb2.ModelVersionStatus.AVAILABLE
_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


def spec_from_signature_def(signature_def) -> SignatureSpec:
    """SignatureSpec from a TF ``SignatureDef`` proto (as GetModelMetadata returns it)."""

    def tensor(info) -> TensorSpec:
        shape = None
        if not info.tensor_shape.unknown_rank:
            shape = tuple(None if d.size < 0 else int(d.size) for d in info.tensor_shape.dim)
        return TensorSpec(numpy_dtype(info.dtype), shape)

    return SignatureSpec(
        inputs={k: tensor(v) for k, v in signature_def.inputs.items()},
        outputs={k: tensor(v) for k, v in signature_def.outputs.items()},
        method_name=signature_def.method_name,
    )


class RemoteBackend:
    kind = "remote"

    def __init__(self, config, address: str) -> None:
        self._config = config
        self._address = address
        self._channel: grpc.aio.Channel | None = None
        self._versions: list[int] = []
        self._specs: dict[int, Mapping[str, SignatureSpec]] = {}
        self._pinned: set[int] = set()
        self._problem: str | None = "not started"
        self._poll_task: asyncio.Task[None] | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    def _connect(self, address: str) -> None:
        self._address = address
        options = [
            ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
        ]
        self._channel = grpc.aio.insecure_channel(address, options=options)
        self._predict_stub = prediction_service_pb2_grpc.PredictionServiceStub(self._channel)
        self._model_stub = model_service_pb2_grpc.ModelServiceStub(self._channel)

    async def start(self) -> None:
        self._connect(self._address)
        await self.refresh()
        self._poll_task = asyncio.get_running_loop().create_task(self._poll_forever())

    async def stop(self) -> None:
        if self._poll_task:
            self._poll_task.cancel()
        if self._channel is not None:
            await self._channel.close()

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self._config.poll_interval_s)
            try:
                await self.refresh()
            except Exception:
                logger.exception("polling TF Serving at %s failed", self._address)

    # -- state ---------------------------------------------------------------------------------
    async def refresh(self) -> None:
        """Re-read which versions TF Serving has AVAILABLE, and their signatures."""
        timeout_s = self._config.backend_timeout_s
        request = get_model_status_pb2.GetModelStatusRequest(
            model_spec=model_pb2.ModelSpec(name=self._config.model_name)
        )
        try:
            status = await self._model_stub.GetModelStatus(request, timeout=timeout_s)
        except grpc.RpcError as exc:
            self._problem = f"TF Serving at {self._address}: {exc.code().name}: {exc.details()}"
            return
        versions = sorted(s.version for s in status.model_version_status if s.state == _AVAILABLE)
        for version in versions:
            if version not in self._specs:
                self._specs[version] = await self._fetch_specs(version)
        self._specs = {v: s for v, s in self._specs.items() if v in versions}
        self._versions = versions
        self._problem = None if versions else f"TF Serving at {self._address} has no AVAILABLE version"

    async def _fetch_specs(self, version: int) -> Mapping[str, SignatureSpec]:
        request = get_model_metadata_pb2.GetModelMetadataRequest(
            model_spec=model_pb2.ModelSpec(name=self._config.model_name, version={"value": version}),
            metadata_field=["signature_def"],
        )
        response = await self._predict_stub.GetModelMetadata(request, timeout=self._config.backend_timeout_s)
        signature_map = get_model_metadata_pb2.SignatureDefMap()
        response.metadata["signature_def"].Unpack(signature_map)
        return {
            name: spec_from_signature_def(sig)
            for name, sig in signature_map.signature_def.items()
            if not name.startswith("__")  # e.g. __saved_model_init_op
        }

    def versions(self) -> list[int]:
        return list(self._versions)

    def signatures(self, version: int) -> Mapping[str, SignatureSpec]:
        return self._specs[version]

    def set_pinned_versions(self, versions: Iterable[int]) -> None:
        self._pinned = set(versions)  # a remote server's policy is its own

    def health_problem(self) -> str | None:
        return self._problem

    # -- inference -----------------------------------------------------------------------------
    async def predict(
        self, version: int, signature: str, inputs: Mapping[str, np.ndarray], output_filter: Iterable[str]
    ) -> dict[str, np.ndarray]:
        request = predict_pb2.PredictRequest(
            model_spec=model_pb2.ModelSpec(
                name=self._config.model_name, version={"value": version}, signature_name=signature
            ),
            output_filter=list(output_filter),
        )
        for name, array in inputs.items():
            request.inputs[name].CopyFrom(from_ndarray(array))
        try:
            response = await self._predict_stub.Predict(request, timeout=self._config.backend_timeout_s)
        except grpc.aio.AioRpcError as exc:
            if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
                raise UnavailableError(f"TF Serving backend unavailable: {exc.details()}") from exc
            raise error_for_code(exc.code().name, f"TF Serving: {exc.details()}") from exc
        return {name: to_ndarray(tensor, name) for name, tensor in response.outputs.items()}
