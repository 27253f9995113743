"""In-process backend: the replica loads SavedModel versions with TensorFlow and runs them.

It watches the model store like TF Serving does: every ``poll_interval_s`` it lists the
versions, loads new ones off the event loop (and replays their warmup records), and drops
the ones that fall out of the policy, swapping the set of loaded versions as one object.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ray_app.backends.base import desired_versions
from ray_app.config import AppConfig
from ray_app.signatures import SignatureSpec, TensorSpec
from training import model_store

logger = logging.getLogger("ray.serve")


@dataclass(frozen=True)
class LoadedVersion:
    version: int
    saved_model: Any  # keeps the functions' variables alive
    functions: Mapping[str, Any]
    specs: Mapping[str, SignatureSpec]


def _spec_of(tensor_spec: Any) -> TensorSpec:
    shape = None if tensor_spec.shape.rank is None else tuple(tensor_spec.shape.as_list())
    dtype = (
        np.dtype(object) if tensor_spec.dtype.name == "string" else np.dtype(tensor_spec.dtype.as_numpy_dtype)
    )
    return TensorSpec(dtype, shape)


def load_version(path: Path, version: int) -> LoadedVersion:
    """Load one SavedModel version and replay its warmup records (blocking; run in a thread)."""
    import tensorflow as tf

    saved_model = tf.saved_model.load(str(path))
    functions = dict(saved_model.signatures)
    specs = {
        name: SignatureSpec(
            inputs={k: _spec_of(v) for k, v in fn.structured_input_signature[1].items()},
            outputs={k: _spec_of(v) for k, v in fn.structured_outputs.items()},
        )
        for name, fn in functions.items()
    }
    loaded = LoadedVersion(version, saved_model, functions, specs)
    _warm_up(loaded, path)
    return loaded


def _warm_up(loaded: LoadedVersion, path: Path) -> None:
    import tensorflow as tf

    records = path / model_store.EXTRA_DIR / model_store.WARMUP_FILE
    if not records.is_file():
        return
    from tensorflow_serving.apis import prediction_log_pb2

    from ray_app.tensors import to_ndarray

    count = 0
    for raw in tf.data.TFRecordDataset(str(records)).take(100):
        log = prediction_log_pb2.PredictionLog.FromString(raw.numpy())
        request = log.predict_log.request
        fn = loaded.functions.get(request.model_spec.signature_name or "serving_default")
        if fn is not None:
            fn(**{k: tf.constant(to_ndarray(v, k)) for k, v in request.inputs.items()})
            count += 1
    logger.info("version %d: replayed %d warmup requests", loaded.version, count)


def run_signature(
    loaded: LoadedVersion, signature: str, inputs: Mapping[str, np.ndarray], output_filter: Iterable[str]
) -> dict[str, np.ndarray]:
    """Run one signature (blocking; run in a thread)."""
    import tensorflow as tf

    outputs = loaded.functions[signature](**{k: tf.constant(v) for k, v in inputs.items()})
    wanted = set(output_filter) or set(outputs)
    return {k: v.numpy() for k, v in outputs.items() if k in wanted}


class EmbeddedBackend:
    kind = "embedded"

    def __init__(self, config: AppConfig) -> None:
        self._config = config
        self._loaded: dict[int, LoadedVersion] = {}
        self._failed: dict[int, str] = {}
        self._pinned: set[int] = set()
        self._task: asyncio.Task[None] | None = None
        self._sync_lock = asyncio.Lock()

    async def start(self) -> None:
        await self.sync()
        self._task = asyncio.get_running_loop().create_task(self._poll_forever())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
        self._loaded = {}

    def versions(self) -> list[int]:
        return sorted(self._loaded)

    def signatures(self, version: int) -> Mapping[str, SignatureSpec]:
        return self._loaded[version].specs

    def set_pinned_versions(self, versions: Iterable[int]) -> None:
        self._pinned = set(versions)

    async def predict(
        self, version: int, signature: str, inputs: Mapping[str, np.ndarray], output_filter: Iterable[str]
    ) -> dict[str, np.ndarray]:
        loaded = self._loaded[version]
        return await asyncio.to_thread(run_signature, loaded, signature, inputs, tuple(output_filter))

    def health_problem(self) -> str | None:
        if self._loaded:
            return None
        where = self._config.model_base_path
        failures = "; ".join(f"version {v}: {e}" for v, e in sorted(self._failed.items()))
        return f"no loadable version of {self._config.model_name!r} in {where}" + (
            f" ({failures})" if failures else ""
        )

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self._config.poll_interval_s)
            try:
                await self.sync()
            except Exception:  # keep polling: a bad listing must not stop hot reload
                logger.exception("model store poll failed")

    async def sync(self) -> None:
        """Bring the loaded set in line with the store and the policy."""
        async with self._sync_lock:
            available = model_store.list_versions(self._config.model_base_path)
            wanted = desired_versions(available, self._config.num_versions, self._pinned)
            new = sorted(wanted - set(self._loaded) - set(self._failed))
            loaded = dict(self._loaded)
            for version in new:
                path = model_store.version_path(self._config.model_base_path, version)
                try:
                    loaded[version] = await asyncio.to_thread(load_version, path, version)
                    logger.info("loaded %s version %d from %s", self._config.model_name, version, path)
                except Exception as exc:  # a broken version must not take the others down
                    logger.exception("failed to load version %d from %s", version, path)
                    self._failed[version] = f"{type(exc).__name__}: {exc}"
            dropped = set(loaded) - wanted
            if not wanted and loaded:
                dropped = set()  # the store vanished: keep serving what we have
            for version in dropped:
                del loaded[version]
                logger.info("unloaded %s version %d", self._config.model_name, version)
            self._loaded = loaded  # one swap: requests see either the old or the new set
            if dropped:
                gc.collect()  # dropped SavedModels sit in reference cycles
