"""``TensorProto`` <-> numpy, checking declared sizes before anything is allocated.

Own conversion instead of ``tf.make_ndarray``/``tf.make_tensor_proto``: no TensorFlow import,
sizes checked against limits first, and several times faster for small tensors.

Decoding (:func:`to_ndarray`) accepts every encoding TF itself accepts: ``tensor_content``
(raw little-endian bytes), the typed repeated fields (``float_val``, ``int_val``, ...) with
exactly one value per element, or a single value that fills the whole tensor. The element
count comes from the declared shape, so it is checked against ``max_elements`` before a byte
is allocated: a 60-byte request cannot declare gigabytes.

Encoding (:func:`from_ndarray`) writes TF Serving's own answer format by default: the typed
repeated fields (``tensorflow::Tensor::AsProtoField``, which TF Serving's Predict uses "for
backward compatibility"; clients such as TF Serving's ``mnist_client.py`` read
``outputs['scores'].float_val`` directly). ``tensor_content`` (``AsProtoTensorContent``, what
``tf.make_tensor_proto`` sends) is the compact choice for requests.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence

import numpy as np

from ray_app.protocol.protos import tensor_pb2, tensor_shape_pb2, types_pb2
from ray_app.protocol.status import InvalidArgumentError, ResourceExhaustedError

# DataType -> (numpy dtype, repeated field holding the values when tensor_content is empty)
_DTYPES: dict[int, tuple[np.dtype, str]] = {
    types_pb2.DT_FLOAT: (np.dtype(np.float32), "float_val"),
    types_pb2.DT_DOUBLE: (np.dtype(np.float64), "double_val"),
    types_pb2.DT_HALF: (np.dtype(np.float16), "half_val"),
    types_pb2.DT_INT32: (np.dtype(np.int32), "int_val"),
    types_pb2.DT_INT16: (np.dtype(np.int16), "int_val"),
    types_pb2.DT_INT8: (np.dtype(np.int8), "int_val"),
    types_pb2.DT_UINT8: (np.dtype(np.uint8), "int_val"),
    types_pb2.DT_UINT16: (np.dtype(np.uint16), "int_val"),
    types_pb2.DT_INT64: (np.dtype(np.int64), "int64_val"),
    types_pb2.DT_UINT32: (np.dtype(np.uint32), "uint32_val"),
    types_pb2.DT_UINT64: (np.dtype(np.uint64), "uint64_val"),
    types_pb2.DT_BOOL: (np.dtype(np.bool_), "bool_val"),
    types_pb2.DT_STRING: (np.dtype(object), "string_val"),
}
_BY_NUMPY = {np_dtype: dt for dt, (np_dtype, _) in _DTYPES.items() if np_dtype != np.dtype(object)}
STRING = np.dtype(object)

# Default bound on the elements one decoded tensor may have (any encoding): 64 Mi elements.
DEFAULT_MAX_ELEMENTS = 64 * 1024 * 1024


def dtype_name(dtype: int) -> str:
    """``DT_FLOAT`` style name of a DataType value."""
    try:
        return types_pb2.DataType.Name(dtype)
    except ValueError:
        return f"DataType({dtype})"


def tf_dtype_string(dtype: int) -> str:
    """TensorFlow's own name of a DataType (``DataTypeString``): float, uint8, string, ..."""
    if dtype == types_pb2.DT_INVALID:
        return "INVALID"
    try:
        return types_pb2.DataType.Name(dtype).removeprefix("DT_").lower()
    except ValueError:
        return f"unknown dtype enum ({dtype})"


def numpy_dtype_or_none(dtype: int) -> np.dtype | None:
    """numpy dtype of a DataType, or None when this server cannot hold it (e.g. complex, resource)."""
    return _DTYPES[dtype][0] if dtype in _DTYPES else None


def numpy_dtype(dtype: int) -> np.dtype:
    """numpy dtype of a DataType (object for strings); INVALID_ARGUMENT for unsupported ones."""
    if dtype not in _DTYPES:
        raise InvalidArgumentError(f"unsupported tensor dtype {dtype_name(dtype)}")
    return _DTYPES[dtype][0]


def dtype_of_numpy(dtype: np.dtype) -> int:
    """DataType of a numpy dtype (object and numpy strings mean DT_STRING)."""
    dtype = np.dtype(dtype)
    if dtype == STRING or dtype.kind in "SU":
        return types_pb2.DT_STRING
    if dtype.newbyteorder("=") in _BY_NUMPY:
        return _BY_NUMPY[dtype.newbyteorder("=")]
    raise InvalidArgumentError(f"cannot encode numpy dtype {dtype}")


def declared_shape(proto: tensor_pb2.TensorProto, name: str = "tensor") -> tuple[int, ...]:
    """The shape a TensorProto declares (known rank, no negative dimension); nothing is decoded."""
    if proto.tensor_shape.unknown_rank:
        raise InvalidArgumentError(f"tensor {name!r}: tensor_shape has unknown rank")
    shape = tuple(int(d.size) for d in proto.tensor_shape.dim)
    if any(d < 0 for d in shape):
        raise InvalidArgumentError(f"tensor {name!r}: negative dimension in shape {list(shape)}")
    return shape


def element_count(shape: Iterable[int]) -> int:
    """Elements of ``shape`` (exact: Python integers cannot overflow)."""
    return math.prod(int(d) for d in shape)


def to_ndarray(
    proto: tensor_pb2.TensorProto, name: str = "tensor", *, max_elements: int = DEFAULT_MAX_ELEMENTS
) -> np.ndarray:
    """Decode a TensorProto as TensorFlow does, if its declared size is at most ``max_elements``.

    Typed values follow ``Tensor::FromProto``: fewer values than elements are padded with the
    last one (zeros when there are none), extra values are ignored, integers are cast like C++
    (``int_val`` 300 as DT_UINT8 is 44). ``tensor_content`` must have exactly the right size.
    INVALID_ARGUMENT "tensor parsing error: <name>" (TF Serving's text) for what TF cannot parse;
    RESOURCE_EXHAUSTED when the shape declares more than ``max_elements`` elements, checked
    before anything is allocated.
    """
    if proto.dtype not in _DTYPES:
        raise InvalidArgumentError(f"tensor parsing error: {name}")
    np_dtype, field = _DTYPES[proto.dtype]
    shape = declared_shape(proto, name)
    count = element_count(shape)
    # The non-zero dimensions count too: [0, 10**9, 10**9] holds nothing, but no array has that shape.
    if max(count, element_count(d for d in shape if d)) > max_elements:
        raise ResourceExhaustedError(
            f"tensor {name!r}: shape {list(shape)} has {count} elements; the limit is {max_elements}"
        )
    if proto.tensor_content and np_dtype != STRING:
        if len(proto.tensor_content) != count * np_dtype.itemsize:
            raise InvalidArgumentError(f"tensor parsing error: {name}")
        little = np.frombuffer(proto.tensor_content, dtype=np_dtype.newbyteorder("<"))
        return little.astype(np_dtype).reshape(shape)
    values = getattr(proto, field)
    given = len(values)  # a repeated field knows its length: nothing is converted yet
    if given >= count:
        return _from_values(values, min(given, count), np_dtype, proto.dtype).reshape(shape)
    array = np.empty(count, dtype=np_dtype)
    if given:
        head = _from_values(values, given, np_dtype, proto.dtype)
        array[:given] = head
        array[given:] = head[-1]
    else:
        array[:] = b"" if np_dtype == STRING else 0
    return array.reshape(shape)


def _from_values(values, count: int, np_dtype: np.dtype, dtype: int) -> np.ndarray:
    """The first ``count`` values of a repeated field, read one by one into the array (np.asarray
    on a repeated field would first copy it into a Python list: ~36 bytes per value)."""
    head = itertools.islice(values, count)
    if np_dtype == STRING:
        array = np.empty(count, dtype=object)
        array[:] = list(head)
        return array
    if dtype == types_pb2.DT_HALF:  # half_val holds the IEEE 754 bit patterns
        return np.fromiter(head, dtype=np.int64, count=count).astype(np.uint16).view(np.float16)
    if field_is_int32(dtype):  # int_val holds int32; narrower types are cast like C++ (wrap)
        return np.fromiter(head, dtype=np.int32, count=count).astype(np_dtype)
    return np.fromiter(head, dtype=np_dtype, count=count)


def field_is_int32(dtype: int) -> bool:
    """Whether the dtype's values travel in ``int_val``."""
    return dtype in _DTYPES and _DTYPES[dtype][1] == "int_val"


def _shape_proto(shape: Sequence[int]) -> tensor_shape_pb2.TensorShapeProto:
    return tensor_shape_pb2.TensorShapeProto(
        dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=int(d)) for d in shape]
    )


def from_ndarray(array: np.ndarray, *, tensor_content: bool = False) -> tensor_pb2.TensorProto:
    """Encode a numpy array (numeric, bool, or bytes/str objects) as a TensorProto.

    Default: typed repeated fields, as TF Serving answers; ``tensor_content=True``: raw bytes,
    as ``tf.make_tensor_proto`` sends numeric tensors (strings always go in ``string_val``).
    """
    array = np.asarray(array)
    dtype = dtype_of_numpy(array.dtype)
    proto = tensor_pb2.TensorProto(dtype=dtype, tensor_shape=_shape_proto(array.shape))
    flat = array.reshape(-1)
    if dtype == types_pb2.DT_STRING:
        proto.string_val.extend(v.encode() if isinstance(v, str) else bytes(v) for v in flat)
    elif tensor_content:
        proto.tensor_content = flat.astype(flat.dtype.newbyteorder("<"), copy=False).tobytes()
    elif dtype == types_pb2.DT_HALF:
        proto.half_val.extend(flat.astype(np.float16).view(np.uint16).tolist())
    else:
        getattr(proto, _DTYPES[dtype][1]).extend(flat.tolist())
    return proto
