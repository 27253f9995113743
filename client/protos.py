"""TF Serving's protobuf modules for the client, without starting TensorFlow's runtime.

``tensorflow_serving.apis.predict_pb2`` imports ``tensorflow.core.framework.tensor_pb2``, and
that import first runs ``tensorflow/__init__.py``: ~2.5 s, hundreds of MiB and C++ log lines
on stderr that ``TF_CPP_MIN_LOG_LEVEL`` no longer silences -- all for a client that only needs
generated message classes. :func:`load_protos` imports those modules under a bare package object
standing in for ``tensorflow`` (same files, same search path) and removes it again, so a later
``import tensorflow`` in the same process still runs the real package and finds the very same
proto modules. If TensorFlow is already imported, or the light import fails, it imports normally.
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


@functools.cache
def load_protos() -> None:
    """Import the client's proto modules (once), without TensorFlow's runtime when possible."""
    if "tensorflow" in sys.modules:
        _import_all()
        return
    spec = importlib.util.find_spec("tensorflow")
    if spec is None or not spec.submodule_search_locations:
        _import_all()  # raises the usual ImportError
        return
    light = types.ModuleType("tensorflow", "package placeholder: proto modules only")
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
