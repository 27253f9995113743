"""Backend that forwards to a TF Serving ``PredictionService`` over gRPC (one batch, one Predict).

Versions and their states come from ``ModelService.GetModelStatus`` (polled), signatures from
``GetModelMetadata``. Every RPC carries a deadline (``backend_timeout_s``). TensorFlow-free:
TF Serving's messages come from ``ray_app.protocol`` and the methods are called by path.

A version the server reports is served only once its directory in ``model_base_path`` (the
remote server's store, mounted here) matches its manifest (``ray_app.integrity``); one that does
not, or that this replica cannot see, is reported END with why and never routed to.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping

import grpc
import numpy as np

from ray_app.backends.base import LoadObserver, VersionState
from ray_app.integrity import REFUSED_CODE, REFUSED_REASON, VersionVerifier
from ray_app.protocol.protos import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_management_pb2,
    model_pb2,
    predict_pb2,
)
from ray_app.protocol.status import NotFoundError, UnavailableError, error_for_code
from ray_app.protocol.tensors import from_ndarray, to_ndarray
from ray_app.signatures import SignatureSpec

logger = logging.getLogger("ray.serve")

_STATE = get_model_status_pb2.ModelVersionStatus.State
_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
_PREDICTION_SERVICE = "/tensorflow.serving.PredictionService/"
_MODEL_SERVICE = "/tensorflow.serving.ModelService/"


def _state(status: get_model_status_pb2.ModelVersionStatus) -> VersionState:
    from ray_app.protocol.protos import error_codes_pb2

    code = error_codes_pb2.Code.Name(status.status.error_code) if status.status.error_code else "OK"
    return VersionState(_STATE.Name(status.state), status.status.error_message or None, code)  # type: ignore[arg-type]


class RemoteBackend:
    kind = "remote"

    def __init__(self, config, address: str) -> None:
        self._config = config
        self._address = address
        self._channel: grpc.aio.Channel | None = None
        self._versions: list[int] = []
        self._states: dict[int, VersionState] = {}
        self._specs: dict[int, Mapping[str, SignatureSpec]] = {}
        self._pinned: set[int] = set()
        self._verifier = VersionVerifier(config.integrity, config.model_base_path)
        self._refused: dict[int, str] = {}  # version -> why it must not be served
        self._problem: str | None = "not started"
        self._poll_task: asyncio.Task[None] | None = None
        self.observer: LoadObserver | None = None  # told of failed loads TF Serving reports (metrics)

    # -- lifecycle ---------------------------------------------------------------------------
    def _connect(self, address: str) -> None:
        self._address = address
        options = [
            ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
        ]
        self._channel = grpc.aio.insecure_channel(address, options=options)

        def method(path: str, response_type):
            return self._channel.unary_unary(
                path,
                request_serializer=lambda m: m.SerializeToString(),
                response_deserializer=response_type.FromString,
            )

        self._predict = method(_PREDICTION_SERVICE + "Predict", predict_pb2.PredictResponse)
        self._metadata = method(
            _PREDICTION_SERVICE + "GetModelMetadata", get_model_metadata_pb2.GetModelMetadataResponse
        )
        self._status = method(_MODEL_SERVICE + "GetModelStatus", get_model_status_pb2.GetModelStatusResponse)
        self._reload = method(
            _MODEL_SERVICE + "HandleReloadConfigRequest", model_management_pb2.ReloadConfigResponse
        )

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
            except Exception:  # keep polling whatever happened
                logger.exception("polling TF Serving at %s failed", self._address)

    # -- state ---------------------------------------------------------------------------------
    async def refresh(self) -> bool:
        """Re-read the versions' states (and new versions' signatures); whether TF Serving answered."""
        timeout_s = self._config.backend_timeout_s
        request = get_model_status_pb2.GetModelStatusRequest(
            model_spec=model_pb2.ModelSpec(name=self._config.model_name)
        )
        try:
            status = await self._status(request, timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:  # NOT_FOUND: up, no version yet
                self._problem = f"TF Serving at {self._address}: {exc.code().name}: {exc.details()}"
                return False
            status = get_model_status_pb2.GetModelStatusResponse()
        states = {s.version: _state(s) for s in status.model_version_status}
        if self.observer is not None:
            for version, state in states.items():
                if state.error and self._states.get(version) != state:  # newly failed
                    self.observer.load_failed(version, self.kind)
        refused = await self._refusals(states)
        if self.observer is not None:
            for version in refused.keys() - self._refused.keys():
                self.observer.load_failed(version, REFUSED_REASON)
        self._refused = refused
        states.update({v: VersionState("END", why, REFUSED_CODE) for v, why in refused.items()})
        versions = sorted(v for v, s in states.items() if s.state == "AVAILABLE")
        for version in list(versions):
            if version not in self._specs:
                try:
                    self._specs[version] = await self._fetch_specs(version)
                except grpc.aio.AioRpcError as exc:  # unloaded since the status call, or slow: next poll
                    logger.warning(
                        "metadata of version %s from %s: %s", version, self._address, exc.code().name
                    )
                    versions.remove(version)
        self._specs = {v: s for v, s in self._specs.items() if v in versions}
        self._states, self._versions = states, versions
        failed = {v: s.error for v, s in states.items() if s.error}
        self._problem = None
        if failed and not versions:
            self._problem = f"TF Serving at {self._address} could not load any version: {failed}"
        return True

    async def _refusals(self, states: Mapping[int, VersionState]) -> dict[int, str]:
        """The versions that must not be served, with why: here, the server's that fail the check."""
        known = sorted(v for v, s in states.items() if s.state in ("AVAILABLE", "LOADING"))
        return await asyncio.to_thread(self._verifier.refusals, known)

    async def _fetch_specs(self, version: int) -> Mapping[str, SignatureSpec]:
        request = get_model_metadata_pb2.GetModelMetadataRequest(
            model_spec=model_pb2.ModelSpec(name=self._config.model_name, version={"value": version}),
            metadata_field=["signature_def"],
        )
        response = await self._metadata(request, timeout=self._config.backend_timeout_s)
        signature_map = get_model_metadata_pb2.SignatureDefMap()
        response.metadata["signature_def"].Unpack(signature_map)
        return {
            name: SignatureSpec.from_signature_def(sig) for name, sig in signature_map.signature_def.items()
        }

    def versions(self) -> list[int]:
        return list(self._versions)

    def version_states(self) -> dict[int, VersionState]:
        return dict(self._states)

    def signatures(self, version: int) -> Mapping[str, SignatureSpec]:
        return self._specs[version]

    def set_pinned_versions(self, versions: Iterable[int]) -> None:
        self._pinned = set(versions)  # a remote server's policy is its own

    def health_problem(self) -> str | None:
        return self._problem

    # -- inference -----------------------------------------------------------------------------
    async def predict(
        self,
        version: int,
        signature: str,
        inputs: Mapping[str, np.ndarray],
        output_filter: Iterable[str],
        *,
        timeout_s: float | None = None,
    ) -> dict[str, np.ndarray]:
        if version in self._refused:  # the predictor routes only to versions(); this holds regardless
            raise NotFoundError(f"version {version} is refused: {self._refused[version]}")
        request = predict_pb2.PredictRequest(
            model_spec=model_pb2.ModelSpec(
                name=self._config.model_name, version={"value": version}, signature_name=signature
            ),
            output_filter=list(output_filter),
        )
        for name, array in inputs.items():
            request.inputs[name].CopyFrom(from_ndarray(array, tensor_content=True))
        try:
            # TF Serving turns the RPC deadline into the session run's timeout_in_ms
            rpc_timeout_s = min(self._config.backend_timeout_s, timeout_s or self._config.backend_timeout_s)
            response = await self._predict(request, timeout=rpc_timeout_s)
        except grpc.aio.AioRpcError as exc:
            if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
                raise UnavailableError(f"TF Serving backend unavailable: {exc.details()}") from exc
            raise error_for_code(exc.code().name, f"TF Serving: {exc.details()}") from exc
        return {name: to_ndarray(tensor, name) for name, tensor in response.outputs.items()}
