"""A stand-in for TF Serving's ``tensorflow_model_server`` binary, for machines that lack it.

Run it exactly like the real binary::

    python tests/fake_tfserving/server.py --port=8500 --model_name=mnist --model_base_path=/models/mnist

It emulates what our backends (``ray_app/backends/tfserving.py``, ``remote.py``) use of TF Serving:
the real binary's flag syntax (``--name=value``, ``--name value`` or a bare ``--flag``; unknown
flags fail as there), ``--model_config_file``, polling every model's base path for integer version
directories and loading what the version policy asks for, and the RPCs the backends call
(``Predict``, ``GetModelMetadata``, ``GetModelStatus``, ``HandleReloadConfigRequest``) with the
real server's status codes and messages, over TCP or ``--grpc_socket_path``.

Not emulated: REST (``--rest_api_port`` must stay 0, as our backends pass it), re-reading the
config file, warmup replay, batching (accepted, requests run one at a time), Classify, Regress,
MultiInference (gRPC's own UNIMPLEMENTED), TLS, GPU memory limits. Other flags of the real binary
are accepted and ignored, like its no-op flags on CPU.
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterable
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import numpy as np

_log = logging.getLogger("tensorflow_model_server")

DEFAULT_SIGNATURE = "serving_default"
SHUTDOWN_GRACE_S = 2.0

# The ModelVersionStatus.State values (get_model_status.proto), usable before TF is imported.
LOADING, AVAILABLE, UNLOADING, END = 20, 30, 40, 50

_CPUS = os.cpu_count() or 1

# name -> (type, default); every flag of the real binary that a deployment is likely to pass.
_FLAG_SPECS: dict[str, tuple[type, Any]] = {
    "port": (int, 8500),
    "grpc_socket_path": (str, ""),
    "rest_api_port": (int, 0),
    "rest_api_num_threads": (int, 4 * _CPUS),
    "rest_api_timeout_in_ms": (int, 30000),
    "rest_api_enable_cors_support": (bool, False),
    "model_name": (str, "default"),
    "model_base_path": (str, ""),
    "model_config_file": (str, ""),
    "model_config_file_poll_wait_seconds": (int, 0),
    "file_system_poll_wait_seconds": (int, 1),
    "flush_filesystem_caches": (bool, True),
    "enable_batching": (bool, False),
    "enable_per_model_batching_parameters": (bool, False),
    "batching_parameters_file": (str, ""),
    "allow_version_labels_for_unavailable_models": (bool, False),
    "num_load_threads": (int, 0),
    "num_unload_threads": (int, 0),
    "max_num_load_retries": (int, 5),
    "load_retry_interval_micros": (int, 60_000_000),
    "tensorflow_session_parallelism": (int, 0),
    "tensorflow_session_config_file": (str, ""),
    "tensorflow_intra_op_parallelism": (int, 0),
    "tensorflow_inter_op_parallelism": (int, 0),
    "per_process_gpu_memory_fraction": (float, 0.0),
    "saved_model_tags": (str, "serve"),
    "grpc_channel_arguments": (str, ""),
    "grpc_max_threads": (int, 4 * _CPUS),
    "enable_grpc_healthcheck_service": (bool, False),
    "enable_model_warmup": (bool, True),
    "num_request_iterations_for_warmup": (int, 1),
    "enable_signature_method_name_check": (bool, False),
    "xla_cpu_compilation_enabled": (bool, False),
    "enable_profiler": (bool, True),
    "remove_unused_fields_from_bundle_metagraph": (bool, True),
    "prefer_tflite_model": (bool, False),
    "use_tflite_model": (bool, False),
    "num_tflite_pools": (int, 1),
    "num_tflite_interpreters_per_pool": (int, 1),
    "enforce_session_run_timeout": (bool, True),
    "use_alts_credentials": (bool, False),
    "ssl_config_file": (str, ""),
    "platform_config_file": (str, ""),
    "monitoring_config_file": (str, ""),
    "thread_pool_factory_config_file": (str, ""),
    "mixed_precision": (str, ""),
    "skip_initialize_tpu": (bool, False),
    "version": (bool, False),
}
_TRUE = {"true", "1", "yes"}
_FALSE = {"false", "0", "no"}


class FlagError(ValueError):
    """The command line cannot be parsed (exit 1, like absl's flag parser)."""


class StartupError(RuntimeError):
    """The server cannot start (exit 255, like the real binary's ``return -1``)."""


class ServingError(Exception):
    """A request fails with a gRPC status code and TF Serving's message text."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


_GRPC_CODES = {code.value[0]: code for code in grpc.StatusCode}


# ---------------------------------------------------------------------------------------------
# Flags and options
# ---------------------------------------------------------------------------------------------


def parse_flags(argv: list[str]) -> dict[str, Any]:
    """Parse TF Serving's command line into ``{flag: value}`` with defaults filled in."""
    values = {name: default for name, (_, default) in _FLAG_SPECS.items()}
    index = 0
    while index < len(argv):
        arg = argv[index]
        index += 1
        if not arg.startswith("-") or arg.strip("-") == "":
            raise FlagError(f"ERROR: unknown argument: {arg}")
        name, has_value, raw = arg.lstrip("-").partition("=")
        if name not in _FLAG_SPECS:
            raise FlagError(f"ERROR: Unknown command line flag '{name}'")
        kind = _FLAG_SPECS[name][0]
        if not has_value:
            if kind is bool:
                raw = "true"
            elif index < len(argv):
                raw = argv[index]
                index += 1
            else:
                raise FlagError(f"ERROR: Missing the value for the flag '{name}'")
        values[name] = _convert_flag(name, kind, raw)
    return values


def _convert_flag(name: str, kind: type, raw: str) -> Any:
    try:
        if kind is bool:
            if raw.lower() in _TRUE:
                return True
            if raw.lower() in _FALSE:
                return False
            raise ValueError(raw)
        return kind(raw)
    except ValueError:
        raise FlagError(f"ERROR: Couldn't interpret value {raw} for flag {name}.") from None


def _usage() -> str:
    lines = ["usage: tensorflow_model_server", "Flags:"]
    for name, (kind, default) in _FLAG_SPECS.items():
        lines.append(f"\t--{name}={str(default).lower() if kind is bool else default}\t{kind.__name__}")
    return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class ServerOptions:
    """What the stand-in does with the flags it honours; built once from the command line."""

    port: int
    grpc_socket_path: str
    model_config_file: str
    file_system_poll_wait_s: int
    enable_batching: bool
    max_num_load_retries: int
    load_retry_interval_s: float
    allow_labels_for_unavailable_models: bool
    saved_model_tags: tuple[str, ...]
    grpc_max_threads: int


def options_from_flags(values: dict[str, Any]) -> ServerOptions:
    """Validate the flags the way the real server does before it loads anything."""
    port = values["port"]
    if not 0 <= port < 65536:
        raise StartupError(f"INVALID_ARGUMENT: --port must be a TCP port in [0, 65535], got {port}")
    if port == 0 and not values["grpc_socket_path"]:  # --port=0 disables TCP (the real flag's help)
        raise StartupError("INVALID_ARGUMENT: --port=0 disables TCP; give --grpc_socket_path")
    if not values["model_config_file"]:
        if not values["model_base_path"]:
            raise StartupError(
                "INVALID_ARGUMENT: Both server_options.model_base_path and "
                "server_options.model_config_file are empty!"
            )
        if not values["model_name"]:
            raise StartupError("INVALID_ARGUMENT: --model_name must not be empty")
    for flag in ("rest_api_port", "model_config_file_poll_wait_seconds"):
        if values[flag]:  # our backends pass neither (ray_app/backends/tfserving.py)
            raise StartupError(f"UNIMPLEMENTED: --{flag} is not emulated by this stand-in")
    if values["enable_batching"] and values["batching_parameters_file"]:
        if not os.access(values["batching_parameters_file"], os.R_OK):
            raise StartupError(
                f"NOT_FOUND: batching parameters file {values['batching_parameters_file']} not readable"
            )
    return ServerOptions(
        port=port,
        grpc_socket_path=values["grpc_socket_path"],
        model_config_file=values["model_config_file"],
        file_system_poll_wait_s=values["file_system_poll_wait_seconds"],
        enable_batching=values["enable_batching"],
        max_num_load_retries=max(0, values["max_num_load_retries"]),
        load_retry_interval_s=max(0, values["load_retry_interval_micros"]) / 1e6,
        allow_labels_for_unavailable_models=values["allow_version_labels_for_unavailable_models"],
        saved_model_tags=tuple(t for t in values["saved_model_tags"].split(",") if t),
        grpc_max_threads=max(1, values["grpc_max_threads"]),
    )


def config_from_options(values: dict[str, Any]) -> Any:
    """The initial ModelServerConfig: the config file, or one model from --model_name/--model_base_path."""
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    path = values["model_config_file"]
    if not path:
        config = model_server_config_pb2.ModelServerConfig()
        model = config.model_config_list.config.add()
        model.name = values["model_name"]
        model.base_path = values["model_base_path"]
        model.model_platform = "tensorflow"
        return config
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise StartupError(f"NOT_FOUND: cannot read model config file {path}: {exc}") from exc
    try:
        config = text_format.Parse(text, model_server_config_pb2.ModelServerConfig())
    except text_format.ParseError as exc:
        raise StartupError(f"INVALID_ARGUMENT: Invalid protobuf file: '{path}': {exc}") from exc
    validate_config(config)
    return config


def validate_config(config: Any) -> None:
    """Reject configs the real ServerCore rejects (raises ServingError)."""
    if config.WhichOneof("config") != "model_config_list":
        raise ServingError(
            grpc.StatusCode.INVALID_ARGUMENT,
            "ServerModelConfig type not supported by HandleReloadConfigRequest. "
            "Only ModelConfigList is currently supported",
        )
    seen: set[str] = set()
    for model in config.model_config_list.config:
        if not model.name or not model.base_path:
            raise ServingError(
                grpc.StatusCode.INVALID_ARGUMENT, f"model config entry needs name and base_path: {model}"
            )
        if model.name in seen:
            raise ServingError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"Illegal to list model {model.name} multiple times in config list",
            )
        seen.add(model.name)
        if model.model_platform not in ("", "tensorflow"):
            raise ServingError(
                grpc.StatusCode.INVALID_ARGUMENT, f"Model platform {model.model_platform} not supported"
            )


# ---------------------------------------------------------------------------------------------
# The model store: which version directories exist, which a policy wants
# ---------------------------------------------------------------------------------------------


def _store_root(base_path: str) -> Path:
    return Path(base_path.removeprefix("file://"))


def list_versions(base_path: str) -> list[int] | None:
    """Complete integer version directories, ascending; None when the base path is missing."""
    root = _store_root(base_path)
    if not root.is_dir():
        return None
    versions = []
    for entry in root.iterdir():
        if entry.name.isdigit() and entry.is_dir():
            if (entry / "saved_model.pb").is_file() or (entry / "saved_model.pbtxt").is_file():
                versions.append(int(entry.name))
    return sorted(versions)


def aspired_versions(policy: Any, versions: list[int]) -> set[int]:
    """The versions a ServableVersionPolicy serves (default: the latest one)."""
    choice = policy.WhichOneof("policy_choice")
    if choice == "all":
        return set(versions)
    if choice == "specific":
        return set(versions) & set(policy.specific.versions)
    count = max(policy.latest.num_versions, 1) if choice == "latest" else 1
    return set(versions[-count:])


# ---------------------------------------------------------------------------------------------
# A loaded version and Predict
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Servable:
    """One loaded version: its SignatureDefs (as the real server reports them) and callables."""

    name: str
    version: int
    path: Path
    signature_defs: dict[str, Any]
    functions: dict[str, Callable[..., Any]]
    loaded: Any  # keeps the SavedModel's resources alive


def _read_signature_defs(path: Path, tags: tuple[str, ...]) -> dict[str, Any]:
    from google.protobuf import text_format
    from google.protobuf.message import DecodeError
    from tensorflow.core.protobuf import saved_model_pb2

    saved_model = saved_model_pb2.SavedModel()
    if (path / "saved_model.pb").is_file():
        try:
            saved_model.ParseFromString((path / "saved_model.pb").read_bytes())
        except DecodeError:
            raise ServingError(
                grpc.StatusCode.DATA_LOSS, f"Can't parse {path / 'saved_model.pb'} as binary proto"
            ) from None
    else:
        try:
            text_format.Parse((path / "saved_model.pbtxt").read_text(), saved_model)
        except text_format.ParseError as exc:
            raise ServingError(
                grpc.StatusCode.DATA_LOSS, f"Can't parse {path / 'saved_model.pbtxt'} as text proto: {exc}"
            ) from None
    for meta_graph in saved_model.meta_graphs:
        if set(meta_graph.meta_info_def.tags) == set(tags):
            return dict(meta_graph.signature_def)
    raise ServingError(
        grpc.StatusCode.NOT_FOUND,
        f"Could not find meta graph def matching supplied tags: {{ {' '.join(tags)} }}. To inspect "
        "available tag-sets in the SavedModel, please use the SavedModel CLI: `saved_model_cli`",
    )


def load_servable(name: str, version: int, path: Path, options: ServerOptions) -> Servable:
    """Load one version with TensorFlow."""
    import tensorflow as tf

    signature_defs = _read_signature_defs(path, options.saved_model_tags)
    loaded = tf.saved_model.load(str(path), tags=list(options.saved_model_tags))
    servable = Servable(name, version, path, signature_defs, dict(loaded.signatures), loaded)
    return servable


def _dtype_name(dtype_enum: int) -> str:
    import tensorflow as tf

    name = tf.dtypes.as_dtype(dtype_enum).name
    return {"float32": "float", "float64": "double", "float16": "half"}.get(name, name)


def _shape_text(dims: Iterable[int]) -> str:
    return "[" + ",".join("?" if d < 0 else str(d) for d in dims) + "]"


def _check_input(alias: str, position: int, tensor: Any, array: np.ndarray, info: Any) -> None:
    """Dtype and shape of one request tensor against the signature's TensorInfo."""
    if info.dtype and tensor.dtype != info.dtype:
        raise ServingError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"Expects arg[{position}] to be {_dtype_name(info.dtype)} but "
            f"{_dtype_name(tensor.dtype)} is provided",
        )
    if info.tensor_shape.unknown_rank:
        return
    expected = [d.size for d in info.tensor_shape.dim]
    compatible = len(expected) == array.ndim and all(
        want < 0 or want == got for want, got in zip(expected, array.shape, strict=True)
    )
    if not compatible:
        raise ServingError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f'input tensor "{alias}" has shape {_shape_text(array.shape)} but the signature '
            f"expects {_shape_text(expected)}",
        )


def _input_size_error(request_inputs: set[str], signature_inputs: set[str]) -> ServingError:
    def names(aliases: set[str]) -> str:
        return "{" + ",".join(sorted(aliases)) + "}"

    return ServingError(
        grpc.StatusCode.INVALID_ARGUMENT,
        f"input size does not match signature: {len(request_inputs)}!={len(signature_inputs)} "
        f"len({names(request_inputs)}) != len({names(signature_inputs)}). "
        f"Sent extra: {names(request_inputs - signature_inputs)}. "
        f"Missing but required: {names(signature_inputs - request_inputs)}.",
    )


def predict(servable: Servable, request: Any) -> Any:
    """Run one PredictRequest against a loaded version (TF Serving's RunPredict)."""
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2

    signature_name = request.model_spec.signature_name or DEFAULT_SIGNATURE
    signature = servable.signature_defs.get(signature_name)
    function = servable.functions.get(signature_name)
    if signature is None or function is None:
        raise ServingError(
            grpc.StatusCode.FAILED_PRECONDITION, f'Serving signature key "{signature_name}" not found.'
        )
    request_inputs, signature_inputs = set(request.inputs), set(signature.inputs)
    missing = signature_inputs - request_inputs
    too_few = len(request_inputs) < len(signature_inputs) and not signature.defaults
    if len(request_inputs) > len(signature_inputs) or too_few:
        raise _input_size_error(request_inputs, signature_inputs)
    arguments: dict[str, Any] = {}
    order = sorted(signature_inputs)
    for alias, tensor in request.inputs.items():
        if alias not in signature.inputs:
            raise ServingError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"input tensor alias not found in signature: {alias}. Inputs expected to be in the "
                f"set {{{','.join(order)}}}.",
            )
        try:
            array = tf.make_ndarray(tensor)
        except Exception:
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, f"tensor parsing error: {alias}") from None
        _check_input(alias, order.index(alias), tensor, array, signature.inputs[alias])
        arguments[alias] = tf.convert_to_tensor(array)
    for alias in sorted(missing):
        if alias not in signature.defaults:
            raise _input_size_error(request_inputs, signature_inputs)
        arguments[alias] = tf.convert_to_tensor(tf.make_ndarray(signature.defaults[alias]))

    wanted = list(request.output_filter) or list(signature.outputs)
    seen: set[str] = set()
    for alias in wanted:
        if alias not in signature.outputs:
            raise ServingError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"output tensor alias not found in signature: {alias} Outputs expected to be in the "
                f"set {{{','.join(sorted(signature.outputs))}}}.",
            )
        if alias in seen:
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, f"duplicate output tensor alias: {alias}")
        seen.add(alias)
    try:
        outputs = function(**arguments)
    except tf.errors.OpError as exc:
        raise ServingError(_GRPC_CODES.get(exc.error_code, grpc.StatusCode.UNKNOWN), exc.message) from exc

    response = predict_pb2.PredictResponse()
    response.model_spec.name = request.model_spec.name
    response.model_spec.version.value = servable.version
    response.model_spec.signature_name = signature_name
    for alias in wanted:
        response.outputs[alias].CopyFrom(_as_proto_field(np.asarray(outputs[alias])))
    return response


# The real server writes outputs with Tensor::AsProtoField: typed repeated fields, not tensor_content.
_PROTO_FIELDS = {
    "float32": "float_val",
    "float64": "double_val",
    "int32": "int_val",
    "int16": "int_val",
    "int8": "int_val",
    "uint8": "int_val",
    "uint16": "int_val",
    "int64": "int64_val",
    "uint32": "uint32_val",
    "uint64": "uint64_val",
    "bool": "bool_val",
    "string": "string_val",
}


def _as_proto_field(array: np.ndarray) -> Any:
    import tensorflow as tf
    from tensorflow.core.framework import tensor_pb2

    dtype = tf.dtypes.as_dtype(array.dtype if array.dtype != object else tf.string)
    field = _PROTO_FIELDS.get(dtype.name)
    if field is None:
        return tf.make_tensor_proto(array)
    proto = tensor_pb2.TensorProto(dtype=dtype.as_datatype_enum)
    for size in array.shape:
        proto.tensor_shape.dim.add(size=size)
    getattr(proto, field).extend(array.ravel().tolist())
    return proto


# ---------------------------------------------------------------------------------------------
# The model manager: versions, their states, polling
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _VersionState:
    state: int
    error: ServingError | None = None
    servable: Servable | None = None
    retry_blocked: bool = False  # a failed version is retried only after it leaves the policy


class ModelManager:
    """Aspired versions in, loaded servables out: TF Serving's ServerCore in miniature."""

    def __init__(self, options: ServerOptions, stop: threading.Event) -> None:
        self._options = options
        self._stop = stop  # cancels load retries at shutdown
        self._lock = threading.Lock()  # guards the maps below
        self._sync_lock = threading.Lock()  # one sync (poll or reload) at a time
        self._models: dict[str, Any] = {}  # name -> ModelConfig
        self._labels: dict[str, dict[str, int]] = {}
        self._states: dict[str, dict[int, _VersionState]] = {}
        self._last_warning: dict[str, str] = {}

    # -- configuration -----------------------------------------------------------------------

    def reload(self, config: Any) -> None:
        """Apply a new ModelServerConfig and sync the store at once; raises ServingError."""
        validate_config(config)
        with self._sync_lock:
            with self._lock:
                self._models = {model.name: model for model in config.model_config_list.config}
                for name in self._models:
                    _log.info(" (Re-)adding model: %s", name)
            self._sync_all()
            labels = {model.name: dict(model.version_labels) for model in config.model_config_list.config}
            self._check_labels(labels)
            with self._lock:
                self._labels = labels

    def _check_labels(self, labels: dict[str, dict[str, int]]) -> None:
        if self._options.allow_labels_for_unavailable_models:
            return
        with self._lock:
            for name, mapping in labels.items():
                for version in mapping.values():
                    record = self._states.get(name, {}).get(version)
                    if record is None or record.state != AVAILABLE:
                        raise ServingError(
                            grpc.StatusCode.FAILED_PRECONDITION,
                            f"Request to assign label to version {version} of model {name}, which is "
                            "not currently available for inference.",
                        )

    def failed_models(self) -> list[str]:
        """``{name: m version: v} due to error: ...`` for models whose every version failed."""
        failures = []
        with self._lock:
            for name in self._models:
                records = self._states.get(name, {})
                if records and not any(r.state == AVAILABLE for r in records.values()):
                    for version, record in sorted(records.items()):
                        if record.error is not None:
                            failures.append(
                                f"{{{{name: {name} version: {version}}} due to error: "
                                f"{record.error.code.name}: {record.error.message}}}"
                            )
        return failures

    # -- polling -----------------------------------------------------------------------------

    def poll_once(self) -> None:
        """Look at every base path once: load what the policies want, unload what they dropped."""
        with self._sync_lock:
            self._sync_all()

    def run_poller(self) -> None:
        """Poll every --file_system_poll_wait_seconds until shutdown (0: only the initial poll)."""
        wait_s = self._options.file_system_poll_wait_s
        if wait_s <= 0:
            return
        while not self._stop.wait(wait_s):
            try:
                self.poll_once()
            except Exception:
                _log.exception("File system poll failed")

    def _sync_all(self) -> None:
        with self._lock:
            models = list(self._models.values())
            removed = [name for name in self._states if name not in self._models]
        for model in models:
            self._sync_model(model.name, model.base_path, model.model_version_policy)
        for name in removed:
            self._apply_policy(name, set(), aspired_exists=False)

    def _warn_once(self, name: str, message: str) -> None:
        if self._last_warning.get(name) != message:
            self._last_warning[name] = message
            _log.warning(message)

    def _sync_model(self, name: str, base_path: str, policy: Any) -> None:
        versions = list_versions(base_path)
        if versions is None:
            self._warn_once(
                name,
                "FileSystemStoragePathSource encountered a filesystem access error: Could not find "
                f"base path {base_path} for servable {name}",
            )
            return  # like the real source: keep serving what is loaded
        if not versions:
            self._warn_once(
                name,
                f"No versions of servable {name} found under base path {base_path}. Did you forget to "
                "name your leaf directory as a number (eg. '/1/')?",
            )
        else:
            self._last_warning.pop(name, None)
        aspired = aspired_versions(policy, versions)
        for version in sorted(aspired, reverse=True):  # highest first, as AvailabilityPreservingPolicy
            with self._lock:
                record = self._states.setdefault(name, {}).get(version)
                if record is not None and (record.state in (LOADING, AVAILABLE) or record.retry_blocked):
                    continue
                self._states[name][version] = _VersionState(LOADING)
            self._load(name, version, _store_root(base_path) / str(version))
        self._apply_policy(name, aspired, aspired_exists=bool(aspired))

    def _load(self, name: str, version: int, path: Path) -> None:
        description = f"Loading servable: {{name: {name} version: {version}}}"
        _log.info(description)
        outcome = self._load_with_retries(description, name, version, path)
        with self._lock:
            if isinstance(outcome, Servable):
                self._states[name][version] = _VersionState(AVAILABLE, servable=outcome)
            else:
                self._states[name][version] = _VersionState(END, error=outcome, retry_blocked=True)
        if isinstance(outcome, Servable):
            _log.info("Successfully loaded servable version {name: %s version: %d}", name, version)

    def _load_with_retries(
        self, description: str, name: str, version: int, path: Path
    ) -> Servable | ServingError:
        """The real server's Retry(): --max_num_load_retries more tries, the version LOADING meanwhile."""
        retries = self._options.max_num_load_retries
        error = ServingError(grpc.StatusCode.UNKNOWN, "not loaded")
        for attempt in range(retries + 1):
            if attempt:
                if self._stop.wait(self._options.load_retry_interval_s):
                    _log.info("Retrying of %s was cancelled.", description)
                    return error
                _log.info("Retrying of %s retry: %d", description, attempt)
            try:
                return load_servable(name, version, path, self._options)
            except Exception as exc:
                error = _as_serving_error(exc)
                _log.error("%s failed: %s: %s", description, error.code.name, error.message)
        if retries:
            _log.info("Retrying of %s exhausted max_num_retries: %d", description, retries)
        return error

    def _apply_policy(self, name: str, aspired: set[int], aspired_exists: bool) -> None:
        """Unload dropped versions, but never the last one serving while its successor fails."""
        unloaded = False
        while True:
            with self._lock:
                records = self._states.get(name, {})
                for version, record in records.items():
                    if version not in aspired:
                        record.retry_blocked = False
                serving_aspired = any(records[v].state == AVAILABLE for v in aspired if v in records)
                serving_dropped = sorted(
                    v for v, r in records.items() if v not in aspired and r.state == AVAILABLE
                )
                # AvailabilityPreservingPolicy: unload only when nothing is aspired, an aspired
                # version serves, or more than one dropped version still serves.
                may_unload = not aspired_exists or serving_aspired or len(serving_dropped) > 1
                if not serving_dropped or not may_unload:
                    break
                version = serving_dropped[0]
                records[version].state = UNLOADING
            _log.info("Unloading servable version {name: %s version: %d}", name, version)
            with self._lock:
                records[version] = _VersionState(END)
            unloaded = True
            _log.info("Done unloading servable version {name: %s version: %d}", name, version)
        if unloaded:
            gc.collect()  # dropped SavedModels sit in reference cycles

    # -- lookups -----------------------------------------------------------------------------

    def resolve(self, model_spec: Any) -> Servable:
        """The loaded version a ModelSpec names (version, version_label, or the latest)."""
        name = model_spec.name
        if not name:
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, "ModelSpec has no name specified.")
        choice = model_spec.WhichOneof("version_choice")
        with self._lock:
            records = self._states.get(name, {})
            if choice == "version_label":
                label = model_spec.version_label
                version = self._labels.get(name, {}).get(label)
                if version is None:
                    raise ServingError(
                        grpc.StatusCode.INVALID_ARGUMENT, f"Unrecognized servable version label: {label}"
                    )
                wanted: int | None = version
            elif choice == "version":
                wanted = model_spec.version.value
            else:
                wanted = None
            if wanted is None:
                available = [v for v, r in records.items() if r.state == AVAILABLE]
                if available:
                    return records[max(available)].servable  # type: ignore[return-value]
                request = f"Latest({name})"
            else:
                record = records.get(wanted)
                if record is not None and record.state == AVAILABLE:
                    return record.servable  # type: ignore[return-value]
                request = f"Specific({name}, {wanted})"
        raise ServingError(grpc.StatusCode.NOT_FOUND, f"Servable not found for request: {request}")

    def version_states(self, model_spec: Any) -> list[tuple[int, int, ServingError | None]]:
        """``(version, state, error)`` per version, as GetModelStatus reports them."""
        name = model_spec.name
        with self._lock:
            records = dict(self._states.get(name, {}))
        if model_spec.HasField("version"):
            version = model_spec.version.value
            if version not in records:
                raise ServingError(
                    grpc.StatusCode.NOT_FOUND, f"Could not find version {version} of model {name}"
                )
            records = {version: records[version]}
        if not records:
            raise ServingError(grpc.StatusCode.NOT_FOUND, f"Could not find any versions of model {name}")
        return [(v, r.state, r.error) for v, r in sorted(records.items())]


def _as_serving_error(exc: BaseException) -> ServingError:
    if isinstance(exc, ServingError):
        return exc
    import tensorflow as tf

    if isinstance(exc, tf.errors.OpError):
        return ServingError(_GRPC_CODES.get(exc.error_code, grpc.StatusCode.UNKNOWN), exc.message)
    return ServingError(grpc.StatusCode.UNKNOWN, f"{type(exc).__name__}: {exc}")


# ---------------------------------------------------------------------------------------------
# gRPC services
# ---------------------------------------------------------------------------------------------


def _handle(context: grpc.ServicerContext, call: Callable[[], Any]) -> Any:
    try:
        return call()
    except ServingError as exc:
        context.abort(exc.code, exc.message)
    except Exception as exc:
        _log.exception("Unexpected error in RPC")
        error = _as_serving_error(exc)
        context.abort(
            grpc.StatusCode.INTERNAL if error.code == grpc.StatusCode.UNKNOWN else error.code, error.message
        )


def _require_model_spec(request: Any) -> None:
    if not request.HasField("model_spec"):
        raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, "Missing ModelSpec")


def get_model_metadata(manager: ModelManager, request: Any) -> Any:
    """GetModelMetadata: the version's SignatureDefMap packed under ``signature_def``."""
    from tensorflow_serving.apis import get_model_metadata_pb2

    _require_model_spec(request)
    if not request.metadata_field:
        raise ServingError(
            grpc.StatusCode.INVALID_ARGUMENT,
            "GetModelMetadataRequest must specify at least one metadata_field",
        )
    for field in request.metadata_field:
        if field != "signature_def":
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT, f"Metadata field {field} is not supported")
    servable = manager.resolve(request.model_spec)
    signature_map = get_model_metadata_pb2.SignatureDefMap()
    for key, signature in servable.signature_defs.items():
        signature_map.signature_def[key].CopyFrom(signature)
    response = get_model_metadata_pb2.GetModelMetadataResponse()
    response.model_spec.name = servable.name
    response.model_spec.version.value = servable.version
    response.metadata["signature_def"].Pack(signature_map)
    return response


def get_model_status(manager: ModelManager, request: Any) -> Any:
    """GetModelStatus: state and load status of every version (or the one asked for)."""
    from tensorflow_serving.apis import get_model_status_pb2

    _require_model_spec(request)
    response = get_model_status_pb2.GetModelStatusResponse()
    for version, state, error in manager.version_states(request.model_spec):
        status = response.model_version_status.add(version=version, state=state)
        status.status.SetInParent()  # the real server always sends a status, OK included
        if error is not None:
            status.status.error_code = error.code.value[0]
            status.status.error_message = error.message
    return response


class PredictionServicer:
    """tensorflow.serving.PredictionService: Predict and GetModelMetadata, what the backends call
    (the other methods are not registered: gRPC answers them UNIMPLEMENTED)."""

    def __init__(self, manager: ModelManager) -> None:
        self._manager = manager

    def Predict(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        def call() -> Any:
            _require_model_spec(request)
            return predict(self._manager.resolve(request.model_spec), request)

        return _handle(context, call)

    def GetModelMetadata(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        return _handle(context, lambda: get_model_metadata(self._manager, request))


class ModelServicer:
    """tensorflow.serving.ModelService."""

    def __init__(self, manager: ModelManager) -> None:
        self._manager = manager

    def GetModelStatus(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        return _handle(context, lambda: get_model_status(self._manager, request))

    def HandleReloadConfigRequest(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        from tensorflow_serving.apis import model_management_pb2

        def call() -> Any:
            try:
                self._manager.reload(request.config)
                failures = self._manager.failed_models()
                if failures:
                    raise ServingError(
                        grpc.StatusCode.UNKNOWN,
                        f"Some models did not become available: {{{', '.join(failures)}, }}",
                    )
            except ServingError as exc:
                _log.error("ReloadConfig failed: %s", exc.message)
                raise
            response = model_management_pb2.ReloadConfigResponse()
            response.status.SetInParent()  # OK
            return response

        return _handle(context, call)


def build_grpc_server(manager: ModelManager, options: ServerOptions) -> grpc.Server:
    """A gRPC server with the methods of TF Serving's two services that our backends call, bound but
    not started; raises StartupError."""
    server_options = [
        ("grpc.max_send_message_length", -1),  # the real server allows INT_MAX-sized messages
        ("grpc.max_receive_message_length", -1),
        ("grpc.so_reuseport", 0),  # a port clash fails loudly instead of sharing the port
    ]
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=options.grpc_max_threads), options=server_options
    )
    from tensorflow_serving.apis import (
        get_model_metadata_pb2,
        get_model_status_pb2,
        model_management_pb2,
        predict_pb2,
    )

    prediction, model = PredictionServicer(manager), ModelServicer(manager)

    def unary(method: Callable[..., Any], request_type: Any) -> grpc.RpcMethodHandler:
        return grpc.unary_unary_rpc_method_handler(
            method,
            request_deserializer=request_type.FromString,
            response_serializer=lambda m: m.SerializeToString(),
        )

    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "tensorflow.serving.PredictionService",
                {
                    "Predict": unary(prediction.Predict, predict_pb2.PredictRequest),
                    "GetModelMetadata": unary(
                        prediction.GetModelMetadata, get_model_metadata_pb2.GetModelMetadataRequest
                    ),
                },
            ),
            grpc.method_handlers_generic_handler(
                "tensorflow.serving.ModelService",
                {
                    "GetModelStatus": unary(model.GetModelStatus, get_model_status_pb2.GetModelStatusRequest),
                    "HandleReloadConfigRequest": unary(
                        model.HandleReloadConfigRequest, model_management_pb2.ReloadConfigRequest
                    ),
                },
            ),
        )
    )
    addresses = [f"0.0.0.0:{options.port}"] if options.port else []
    if options.grpc_socket_path:
        addresses.append(f"unix:{options.grpc_socket_path}")
    for address in addresses:
        try:
            server.add_insecure_port(address)
        except RuntimeError as exc:
            raise StartupError(
                f"UNAVAILABLE: Failed to BuildAndStart gRPC server on {address}: {exc}"
            ) from exc
    return server


class _GlogFormatter(logging.Formatter):
    """``I1125 00:38:12.123456  4242 server.py:123] message``, like the real server's log."""

    def format(self, record: logging.LogRecord) -> str:
        when = datetime.datetime.fromtimestamp(record.created)
        text = (
            f"{record.levelname[0]}{when:%m%d %H:%M:%S.%f} {record.process:>6} "
            f"{record.filename}:{record.lineno}] {record.getMessage()}"
        )
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def serve(values: dict[str, Any]) -> int:
    """Load the configured models, then serve until SIGTERM/SIGINT; returns the exit status."""
    options = options_from_flags(values)
    try:
        config = config_from_options(values)
    except ServingError as exc:
        raise StartupError(f"{exc.code.name}: {exc.message}") from exc
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())

    if options.enable_batching:
        _log.warning("Batching is accepted but not emulated: requests run one at a time")

    manager = ModelManager(options, stop)
    try:
        manager.reload(config)
    except ServingError as exc:
        raise StartupError(f"{exc.code.name}: {exc.message}") from exc
    if stop.is_set():
        return 0
    failures = manager.failed_models()
    if failures:
        raise StartupError(
            f"UNKNOWN: {len(failures)} servable(s) did not become available: {{{', '.join(failures)}, }}"
        )

    server = build_grpc_server(manager, options)
    server.start()
    if options.grpc_socket_path:
        _log.info("Running gRPC ModelServer at UNIX socket %s ...", options.grpc_socket_path)
    if options.port:
        _log.info("Running gRPC ModelServer at 0.0.0.0:%d ...", options.port)

    poller = threading.Thread(target=manager.run_poller, name="fs-poll", daemon=True)
    poller.start()

    while not stop.wait(0.5):
        pass
    _log.info("Shutting down the model server")
    server.stop(SHUTDOWN_GRACE_S).wait()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point with the real binary's exit statuses: 0 ok, 1 bad flags, 255 failed start."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_GlogFormatter())
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
    args = sys.argv[1:] if argv is None else argv
    if any(arg.lstrip("-") in ("help", "helpfull", "h") for arg in args):
        print(_usage())
        return 0
    try:
        values = parse_flags(args)
    except FlagError as exc:
        print(exc, file=sys.stderr)
        print(_usage(), file=sys.stderr)
        return 1
    if values["version"]:
        from importlib import metadata

        print(f"TensorFlow ModelServer: {metadata.version('tensorflow-serving-api')}")
        print(f"TensorFlow Library: {metadata.version('tensorflow')}")
        return 0
    try:
        return serve(values)
    except StartupError as exc:
        print(f"Failed to start server. Error: {exc}", file=sys.stderr)
        return 255


if __name__ == "__main__":
    sys.exit(main())
