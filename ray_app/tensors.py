"""TensorProto <-> numpy, with clear errors for malformed tensors.

Own conversion instead of ``tf.make_ndarray``/``tf.make_tensor_proto``: it checks sizes
against the declared shape, and it is several times faster for small tensors.
"""

from __future__ import annotations

import numpy as np
from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2

from ray_app.errors import InvalidArgumentError

# DataType -> (numpy dtype, repeated field used when tensor_content is empty)
_DTYPES: dict[int, tuple[np.dtype, str]] = {
    types_pb2.DT_FLOAT: (np.dtype(np.float32), "float_val"),
    types_pb2.DT_DOUBLE: (np.dtype(np.float64), "double_val"),
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


def dtype_name(dtype: int) -> str:
    """``DT_FLOAT`` style name of a DataType value."""
    try:
        return types_pb2.DataType.Name(dtype)
    except ValueError:
        return f"DataType({dtype})"


def numpy_dtype(dtype: int) -> np.dtype:
    """numpy dtype of a DataType (object for strings)."""
    if dtype not in _DTYPES:
        raise InvalidArgumentError(f"unsupported tensor dtype {dtype_name(dtype)}")
    return _DTYPES[dtype][0]


def to_ndarray(proto: tensor_pb2.TensorProto, name: str = "tensor") -> np.ndarray:
    """Decode a TensorProto, checking its values against its shape."""
    np_dtype, field = _DTYPES[proto.dtype] if proto.dtype in _DTYPES else (None, None)
    if np_dtype is None:
        raise InvalidArgumentError(f"input {name!r}: unsupported dtype {dtype_name(proto.dtype)}")
    if proto.tensor_shape.unknown_rank:
        raise InvalidArgumentError(f"input {name!r}: tensor_shape has unknown rank")
    shape = tuple(int(d.size) for d in proto.tensor_shape.dim)
    if any(d < 0 for d in shape):
        raise InvalidArgumentError(f"input {name!r}: negative dimension in shape {list(shape)}")
    count = int(np.prod(shape, dtype=np.int64))
    if proto.tensor_content and np_dtype != np.dtype(object):
        content = proto.tensor_content
        if len(content) != count * np_dtype.itemsize:
            raise InvalidArgumentError(
                f"input {name!r}: tensor_content has {len(content)} bytes, shape {list(shape)} "
                f"of {dtype_name(proto.dtype)} needs {count * np_dtype.itemsize}"
            )
        return np.frombuffer(content, dtype=np_dtype.newbyteorder("<")).astype(np_dtype).reshape(shape)
    values = getattr(proto, field)
    if len(values) == count:
        array = np.array(list(values) if np_dtype == np.dtype(object) else values, dtype=np_dtype)
        return array.reshape(shape)
    if len(values) == 1 and count > 1:  # TF semantics: one value fills the tensor
        return np.full(shape, values[0], dtype=np_dtype)
    raise InvalidArgumentError(
        f"input {name!r}: {len(values)} values for shape {list(shape)} ({count} elements)"
    )


def from_ndarray(array: np.ndarray) -> tensor_pb2.TensorProto:
    """Encode a numpy array (numeric, bool or bytes/str objects) as a TensorProto."""
    array = np.asarray(array)
    shape = tensor_shape_pb2.TensorShapeProto(
        dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=int(d)) for d in array.shape]
    )
    if array.dtype == np.dtype(object) or array.dtype.kind in "SU":
        values = [v.encode() if isinstance(v, str) else bytes(v) for v in array.reshape(-1)]
        return tensor_pb2.TensorProto(dtype=types_pb2.DT_STRING, tensor_shape=shape, string_val=values)
    if array.dtype not in _BY_NUMPY:
        raise InvalidArgumentError(f"cannot encode numpy dtype {array.dtype}")
    little = array.astype(array.dtype.newbyteorder("<"), copy=False)
    return tensor_pb2.TensorProto(
        dtype=_BY_NUMPY[array.dtype], tensor_shape=shape, tensor_content=little.tobytes()
    )


def dtype_of_numpy(dtype: np.dtype) -> int:
    """DataType of a numpy dtype (object means DT_STRING)."""
    if dtype == np.dtype(object):
        return types_pb2.DT_STRING
    return _BY_NUMPY[np.dtype(dtype)]
