"""In-process backend: the replica loads SavedModel versions with TensorFlow and runs them.

It watches the model store like TF Serving does: every ``poll_interval_s`` it lists the
versions, loads new ones off the event loop (and replays their warmup records), and drops
the ones that fall out of the policy, swapping the set of loaded versions as one object.
Before a version is loaded its files are checked against its manifest (``ray_app.integrity``):
one that does not match is refused like a failed load. A version that fails to load (corrupt,
refused, or a transient error such as an NFS hiccup or lack of memory) is never served, is reported in model status (state END with the error), and is
tried again with exponential backoff; the versions already loaded keep serving meanwhile.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ray_app import model_store
from ray_app.backends.base import AVAILABLE, LoadObserver, VersionState, desired_versions
from ray_app.config import AppConfig
from ray_app.integrity import REFUSED_CODE, VersionVerifier
from ray_app.manifest import IntegrityError
from ray_app.protocol.protos import error_codes_pb2, saved_model_pb2
from ray_app.protocol.status import DeadlineExceededError, FailedPreconditionError, error_for_code
from ray_app.signatures import SignatureSpec

logger = logging.getLogger("ray.serve")


@dataclass(frozen=True)
class LoadedVersion:
    version: int
    saved_model: Any  # keeps the functions' variables alive
    functions: Mapping[str, Any]
    specs: Mapping[str, SignatureSpec]


def read_signature_defs(path: Path) -> dict[str, SignatureSpec]:
    """The SignatureDefs in a version's ``saved_model.pb``, exactly as TF Serving reads them."""
    saved_model = saved_model_pb2.SavedModel.FromString((path / "saved_model.pb").read_bytes())
    if not saved_model.meta_graphs:
        raise ValueError(f"{path / 'saved_model.pb'} holds no MetaGraph")
    signature_defs = saved_model.meta_graphs[0].signature_def
    return {name: SignatureSpec.from_signature_def(sig) for name, sig in signature_defs.items()}


def load_version(path: Path, version: int) -> LoadedVersion:
    """Load one SavedModel version and replay its warmup records (blocking; run in a thread)."""
    import tensorflow as tf

    specs = read_signature_defs(path)
    saved_model = tf.saved_model.load(str(path))
    functions = dict(saved_model.signatures)
    loaded = LoadedVersion(version, saved_model, functions, specs)
    _warm_up(loaded, path)
    return loaded


def _warm_up(loaded: LoadedVersion, path: Path) -> None:
    import tensorflow as tf

    records = path / model_store.EXTRA_DIR / model_store.WARMUP_FILE
    if not records.is_file():
        return
    from tensorflow_serving.apis import prediction_log_pb2

    from ray_app.protocol.tensors import to_ndarray

    count = 0
    for raw in tf.data.TFRecordDataset(str(records)).take(100):
        log = prediction_log_pb2.PredictionLog.FromString(raw.numpy())
        request = log.predict_log.request
        fn = loaded.functions.get(request.model_spec.signature_name or "serving_default")
        if fn is not None:
            fn(**{k: tf.constant(to_ndarray(v, k)) for k, v in request.inputs.items()})
            count += 1
    logger.info("version %d: replayed %d warmup requests", loaded.version, count)


def _call(loaded: LoadedVersion, signature: str, inputs: Mapping[str, np.ndarray], wanted: set[str]):
    """One call of the signature's function. TF's own errors keep their code and text, as TF
    Serving answers them (e.g. INVALID_ARGUMENT from a kernel)."""
    import tensorflow as tf

    try:
        outputs = loaded.functions[signature](**{k: tf.constant(v) for k, v in inputs.items()})
    except tf.errors.OpError as exc:
        raise error_for_code(error_codes_pb2.Code.Name(exc.error_code), exc.message) from exc
    return {k: v.numpy() for k, v in outputs.items() if not wanted or k in wanted}


def _rows(inputs: Mapping[str, np.ndarray]) -> int | None:
    """The batch dimension every input shares, None when they do not share one."""
    leading = {a.shape[0] if a.ndim else None for a in inputs.values()}
    return leading.pop() if len(leading) == 1 else None


def run_signature(
    loaded: LoadedVersion,
    signature: str,
    inputs: Mapping[str, np.ndarray],
    output_filter: Iterable[str],
    max_rows: int | None = None,
    stop_at_s: float | None = None,
) -> dict[str, np.ndarray]:
    """Run one signature (blocking; run in a thread), at most ``max_rows`` images a call.

    A larger batch runs in slices of ``max_rows``, one after another, and their outputs are
    joined, as TF Serving's batching does with ``enable_large_batch_splitting`` and
    ``max_execution_batch_size``: the model's activations grow with the images of one call
    (measured with the project's CNN, four 1,024-image requests at once: +434 MiB whole, +65 MiB
    in slices of 128; bench/execution_slices.py), so a slice bounds them whatever a request
    carries. Outputs that are not one row per image (a signature that reduces over the
    batch) cannot be joined: such a batch runs whole. No slice starts after ``stop_at_s``
    (time.monotonic): nobody waits for the answer then.
    """
    wanted = set(output_filter)
    rows = _rows(inputs)
    if max_rows is None or rows is None or rows <= max_rows:
        return _call(loaded, signature, inputs, wanted)
    parts: list[dict[str, np.ndarray]] = []
    for start in range(0, rows, max_rows):
        if stop_at_s is not None and time.monotonic() > stop_at_s:
            raise DeadlineExceededError("the request's deadline passed while the model ran its slices")
        piece = {k: v[start : start + max_rows] for k, v in inputs.items()}
        outputs = _call(loaded, signature, piece, wanted)
        if not parts and any(o.ndim == 0 or o.shape[0] != max_rows for o in outputs.values()):
            return _call(loaded, signature, inputs, wanted)  # not one output row per image
        parts.append(outputs)
    return {k: np.concatenate([part[k] for part in parts]) for k in parts[0]}


@dataclass(frozen=True)
class LoadFailure:
    """A version that failed to load: why, how often, and when it is tried again."""

    error: str
    attempts: int
    retry_at_s: float  # time.monotonic() after which the next attempt may run
    code: str = "UNKNOWN"  # the tensorflow::error::Code name model status reports


def retry_delay_s(attempts: int, initial_s: float, max_s: float) -> float:
    """Exponential backoff: ``initial_s`` after the first failure, doubling, at most ``max_s``."""
    return min(max_s, initial_s * 2 ** (attempts - 1))


class EmbeddedBackend:
    kind = "embedded"

    def __init__(self, config: AppConfig) -> None:
        self._config = config
        self._verifier = VersionVerifier(config.integrity, config.model_base_path)
        self._loaded: dict[int, LoadedVersion] = {}
        self._failed: dict[int, LoadFailure] = {}
        self._loading: set[int] = set()
        self._pinned: set[int] = set()
        self._task: asyncio.Task[None] | None = None
        self._sync_lock = asyncio.Lock()
        self.observer: LoadObserver | None = None  # told of each load and failure (metrics)

    async def start(self) -> None:
        try:
            await self.sync()
        except Exception:  # an unreadable store must not fail the replica: polling retries
            logger.exception("first look at the model store failed; will retry")
        self._task = asyncio.get_running_loop().create_task(self._poll_forever())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
        self._loaded = {}

    def versions(self) -> list[int]:
        return sorted(self._loaded)

    def version_states(self) -> dict[int, VersionState]:
        states = {v: VersionState("END", f.error, f.code) for v, f in self._failed.items()}
        states.update({v: VersionState("LOADING") for v in self._loading})
        states.update({v: AVAILABLE for v in self._loaded})
        return states

    def signatures(self, version: int) -> Mapping[str, SignatureSpec]:
        return self._loaded[version].specs

    def set_pinned_versions(self, versions: Iterable[int]) -> None:
        self._pinned = set(versions)

    async def predict(
        self,
        version: int,
        signature: str,
        inputs: Mapping[str, np.ndarray],
        output_filter: Iterable[str],
        *,
        timeout_s: float | None = None,
    ) -> dict[str, np.ndarray]:
        loaded = self._loaded[version]
        if signature not in loaded.functions:  # e.g. __saved_model_init_op: described, not callable
            raise FailedPreconditionError(f"signature {signature!r} of version {version} cannot be run")
        timeout_s = self._config.backend_timeout_s if timeout_s is None else timeout_s
        call = asyncio.to_thread(
            run_signature,
            loaded,
            signature,
            inputs,
            tuple(output_filter),
            self._config.limits.max_execution_batch_size,
            time.monotonic() + timeout_s,
        )
        try:
            # TF cannot be interrupted: the thread finishes, but the callers get their answer in time
            return await asyncio.wait_for(call, timeout_s)
        except TimeoutError:
            raise DeadlineExceededError(f"the model did not answer within {timeout_s:.3f} s") from None

    def health_problem(self) -> str | None:
        """Unhealthy only when nothing can be served because loads failed (waiting is healthy)."""
        if self._loaded or not self._failed:
            return None
        failures = "; ".join(f"version {v}: {f.error}" for v, f in sorted(self._failed.items()))
        return (
            f"no version of {self._config.model_name!r} in {self._config.model_base_path} loads ({failures})"
        )

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self._config.poll_interval_s)
            try:
                await self.sync()
            except Exception:  # keep polling: a bad listing must not stop hot reload
                logger.exception("model store poll failed")

    async def sync(self) -> None:
        """Bring the loaded set in line with the store and the policy; retry failed loads with backoff.

        The policy (latest ``num_versions`` plus labelled ones) is applied to the versions that
        load: while a new version is broken, the newest good ones serve in its place.
        """
        async with self._sync_lock:
            # off the event loop: a shared file system (EFS, NFS) can stall a listing
            available = await asyncio.to_thread(model_store.list_versions, self._config.model_base_path)
            policy = desired_versions(available, self._config.num_versions, self._pinned)
            now_s = time.monotonic()
            retry = {v for v in policy if v in self._failed and self._failed[v].retry_at_s <= now_s}
            loaded, tried = dict(self._loaded), set()
            while True:
                wanted = self._servable(available)
                due = sorted(((wanted | retry) - set(loaded)) - tried)
                if not due:
                    break
                for version in due:
                    tried.add(version)
                    loaded_version = await self._load(version)
                    if loaded_version is not None:
                        loaded[version] = loaded_version
            self._failed = {v: f for v, f in self._failed.items() if v in policy}
            keep = wanted if available else set(loaded)  # an empty or unreadable store: keep what we have
            dropped = set(loaded) - keep
            for version in dropped:
                del loaded[version]
                logger.info("unloaded %s version %d", self._config.model_name, version)
            self._loaded = loaded  # one swap: requests see either the old or the new set
            if dropped:
                # dropped SavedModels sit in reference cycles; collecting them takes tens of ms
                await asyncio.to_thread(gc.collect)

    def _servable(self, available: list[int]) -> set[int]:
        """The policy over the versions not known to be broken."""
        loadable = [v for v in available if v not in self._failed]
        return desired_versions(loadable, self._config.num_versions, self._pinned)

    async def _load(self, version: int) -> LoadedVersion | None:
        path = model_store.version_path(self._config.model_base_path, version)
        self._loading.add(version)
        started_s = time.monotonic()
        try:
            loaded = await asyncio.to_thread(self._verify_and_load, path, version)
        except Exception as exc:  # a broken version must not take the others down
            self._record_failure(version, path, exc)
            if self.observer is not None:
                self.observer.load_failed(version, type(exc).__name__)
            return None
        finally:
            self._loading.discard(version)
        self._failed.pop(version, None)
        if self.observer is not None:
            self.observer.loaded(version, time.monotonic() - started_s)
        logger.info("loaded %s version %d from %s", self._config.model_name, version, path)
        return loaded

    def _verify_and_load(self, path: Path, version: int) -> LoadedVersion:
        self._verifier.check(version)
        return load_version(path, version)

    def _record_failure(self, version: int, path: Path, exc: Exception) -> None:
        attempts = self._failed[version].attempts + 1 if version in self._failed else 1
        delay_s = retry_delay_s(attempts, self._config.load_retry_initial_s, self._config.load_retry_max_s)
        error = f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
        code = REFUSED_CODE if isinstance(exc, IntegrityError) else "UNKNOWN"
        self._failed[version] = LoadFailure(error, attempts, time.monotonic() + delay_s, code)
        logger.error(
            "failed to load version %d from %s (attempt %d; next try in %.0f s): %s",
            version, path, attempts, delay_s, error,
        )  # fmt: skip
