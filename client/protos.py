"""TF Serving's protobuf modules for the client, without starting TensorFlow's runtime.

``tensorflow_serving.apis.predict_pb2`` imports ``tensorflow.core.framework.tensor_pb2``, and
that import first runs ``tensorflow/__init__.py``: ~2.5 s, hundreds of MiB and C++ log lines
on stderr that ``TF_CPP_MIN_LOG_LEVEL`` no longer silences -- all for a client that only needs
generated message classes.

Command-line entry points that never use TensorFlow itself (``client/grpc_client.py``,
``client/pipeline.py``) call :func:`use_light_import` first: :func:`load_protos` then imports
the proto modules under a bare package object standing in for ``tensorflow`` (same files, same
search path) and removes it again. That is only for such processes: a later real
``import tensorflow`` triggered from inside another TF Serving proto import can fail on the
already-loaded submodules (seen: ``NameError: name 'Example' is not defined``). Library users
(``bench/``, tests, your code) get the normal import. If TensorFlow is already imported, or
the light import fails, it imports normally too.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import sys
import types

# What the client needs, in import order; ray_app.tensors is our TensorProto <-> numpy code.
_MODULES = (
    "tensorflow.core.framework.types_pb2",
    "tensorflow.core.framework.tensor_shape_pb2",
    "tensorflow.core.framework.tensor_pb2",
    "tensorflow_serving.apis.predict_pb2",
    "ray_app.tensors",
)


_light_import = False


def use_light_import() -> None:
    """Opt in, for a process that will never import TensorFlow itself (see the module doc)."""
    global _light_import
    _light_import = True


@functools.cache
def load_protos() -> None:
    """Import the client's proto modules (once); without TensorFlow's runtime if opted in."""
    if not _light_import or "tensorflow" in sys.modules:
        _import_all()
        return
    spec = importlib.util.find_spec("tensorflow")
    if spec is None or not spec.submodule_search_locations:
        _import_all()  # raises the usual ImportError
        return
    light = types.ModuleType("tensorflow", "stand-in package: proto modules only")
    light.__path__ = list(spec.submodule_search_locations)
    sys.modules["tensorflow"] = light
    try:
        _import_all()
    except ImportError:
        _forget_light_imports()
        _import_all()
    finally:
        if sys.modules.get("tensorflow") is light:
            del sys.modules["tensorflow"]


def _import_all() -> None:
    for name in _MODULES:
        importlib.import_module(name)


def _forget_light_imports() -> None:
    for name in [
        n for n in sys.modules if n == "tensorflow" or n.startswith(("tensorflow.", "tensorflow_serving"))
    ]:
        del sys.modules[name]
    sys.modules.pop("ray_app.tensors", None)
