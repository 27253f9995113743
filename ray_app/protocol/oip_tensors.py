"""Open Inference Protocol (KServe v2 / Triton) tensors <-> numpy, sizes checked before allocation.

A tensor on this protocol is a name, a ``datatype`` string (``FP32``, ``UINT8``, ``BYTES``, ...), a
``shape`` and its data in one of four forms: raw little-endian bytes (gRPC ``raw_input_contents``,
REST's binary tensor extension), typed repeated fields (gRPC ``InferTensorContents``), or a JSON
array, nested or flat (REST ``data``). ``BYTES`` elements travel raw as a 4-byte little-endian
length followed by the bytes, element after element (Triton's ``serialize_byte_tensor``, the
``binary_tensor_data`` extension).

Every decoder here is given the declared shape, whose size the caller has already compared with
the limits (``ray_app.oip_api.check_declared``), and refuses data that does not hold exactly that
many elements: the work and memory of a decode are bounded by the declared shape and by the data
already received, never by a count the data itself claims.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from ray_app.protocol.status import InvalidArgumentError
from ray_app.protocol.tensors import STRING

# datatype -> numpy dtype (object for BYTES), the OIP data types of the spec's "Tensor Data Types"
DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": STRING,
}
_BY_NUMPY = {dtype: name for name, dtype in DATATYPES.items() if dtype != STRING}

# datatype -> the InferTensorContents field that carries it (FP16 has none: raw only)
CONTENTS_FIELDS: dict[str, str] = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
_LENGTH = struct.Struct("<I")
_INT_RANGES = {
    name: (int(np.iinfo(d).min), int(np.iinfo(d).max)) for name, d in DATATYPES.items() if d.kind in "iu"
}


def numpy_dtype(datatype: str, name: str) -> np.dtype:
    """numpy dtype of an OIP datatype; INVALID_ARGUMENT for one this server does not hold (BF16)."""
    if datatype not in DATATYPES:
        raise InvalidArgumentError(f"invalid datatype '{datatype[:40]}' for input '{name}'")
    return DATATYPES[datatype]


def datatype_of(dtype: np.dtype) -> str:
    """OIP datatype of a numpy dtype (object and numpy strings mean BYTES)."""
    known = _BY_NUMPY.get(dtype)  # the usual case: a native numeric dtype
    if known is not None:
        return known
    dtype = np.dtype(dtype)
    if dtype == STRING or dtype.kind in "SU":
        return "BYTES"
    return _BY_NUMPY[dtype.newbyteorder("=")]


def element_count(shape: Iterable[int]) -> int:
    return math.prod(int(d) for d in shape)


def check_shape(name: str, shape: Sequence[Any]) -> tuple[int, ...]:
    """A declared shape as integers; INVALID_ARGUMENT for negative or non-integer dimensions."""
    dims = []
    for dim in shape:
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 0:
            raise InvalidArgumentError(
                f"invalid shape for input '{name}': shape {_shape_text(shape)} contains one or more "
                "invalid dimensions"
            )
        dims.append(int(dim))
    return tuple(dims)


def _shape_text(shape: Sequence[Any]) -> str:
    text = "[" + ",".join(str(d) for d in list(shape)[:8]) + (",..." if len(shape) > 8 else "") + "]"
    return text[:200]


# -- raw bytes ---------------------------------------------------------------------------------------
def raw_size(datatype: str, shape: Sequence[int]) -> int | None:
    """Bytes a fixed-size tensor takes raw; None for BYTES (its size depends on its elements)."""
    dtype = DATATYPES[datatype]
    return None if dtype == STRING else element_count(shape) * dtype.itemsize


def from_raw(name: str, datatype: str, shape: Sequence[int], raw: bytes | memoryview) -> np.ndarray:
    """Decode raw little-endian data (or length-prefixed BYTES) of exactly the declared shape."""
    dtype = DATATYPES[datatype]
    if dtype == STRING:
        return from_raw_bytes(name, shape, raw).reshape(shape)
    expected = element_count(shape) * dtype.itemsize
    if len(raw) != expected:
        raise InvalidArgumentError(
            f"unexpected size {len(raw)} for input '{name}', expecting {expected} bytes "
            f"({datatype} {_shape_text(shape)})"
        )
    return np.frombuffer(raw, dtype=dtype.newbyteorder("<")).astype(dtype).reshape(shape)


def from_raw_bytes(name: str, shape: Sequence[int], raw: bytes | memoryview) -> np.ndarray:
    """BYTES elements from their raw form: exactly ``element_count(shape)`` length-prefixed items."""
    count = element_count(shape)
    view = memoryview(raw).cast("B")
    items: list[bytes] = []
    offset = 0
    while offset < len(view):
        if len(items) == count:
            raise InvalidArgumentError(
                f"unexpected size for input '{name}': more than the {count} BYTES elements its shape holds"
            )
        if offset + _LENGTH.size > len(view):
            raise InvalidArgumentError(f"input '{name}': a BYTES element's 4-byte length is cut short")
        (length,) = _LENGTH.unpack_from(view, offset)
        offset += _LENGTH.size
        if offset + length > len(view):
            raise InvalidArgumentError(
                f"input '{name}': a BYTES element declares {length} bytes, only {len(view) - offset} follow"
            )
        items.append(bytes(view[offset : offset + length]))
        offset += length
    if len(items) != count:
        raise InvalidArgumentError(
            f"unexpected size for input '{name}': {len(items)} BYTES elements, its shape holds {count}"
        )
    array = np.empty(count, dtype=object)
    array[:] = items
    return array


def to_raw(array: np.ndarray) -> bytes:
    """One tensor's raw form: little-endian values, or length-prefixed BYTES elements."""
    array = np.asarray(array)
    if datatype_of(array.dtype) == "BYTES":
        parts = []
        for value in array.reshape(-1):
            data = value.encode() if isinstance(value, str) else bytes(value)
            parts += [_LENGTH.pack(len(data)), data]
        return b"".join(parts)
    return array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()


# -- typed contents (gRPC InferTensorContents) ---------------------------------------------------------
def from_contents(name: str, datatype: str, shape: Sequence[int], contents: Any) -> np.ndarray:
    """Decode the typed field of ``datatype``: exactly one value per element (as Triton requires)."""
    if datatype not in CONTENTS_FIELDS:
        raise InvalidArgumentError(f"input '{name}': {datatype} data must be sent in raw_input_contents")
    values = getattr(contents, CONTENTS_FIELDS[datatype])
    count = element_count(shape)
    if len(values) != count:
        raise InvalidArgumentError(
            f"unexpected number of values for input '{name}': {len(values)} in "
            f"{CONTENTS_FIELDS[datatype]}, its shape {_shape_text(shape)} holds {count}"
        )
    dtype = DATATYPES[datatype]
    if dtype == STRING:
        array = np.empty(count, dtype=object)
        array[:] = list(values)
        return array.reshape(shape)
    if datatype in _INT_RANGES:
        low, high = _INT_RANGES[datatype]
        wide = np.asarray(values, dtype=np.int64 if datatype != "UINT64" else np.uint64)
        if wide.size and (int(wide.min()) < low or int(wide.max()) > high):
            raise InvalidArgumentError(f"input '{name}': a value is out of range for {datatype}")
        return wide.astype(dtype).reshape(shape)
    return np.asarray(values, dtype=dtype).reshape(shape)


def to_contents(array: np.ndarray, contents: Any) -> None:
    """Write ``array`` into the typed field of its datatype (FP16 has none: use :func:`to_raw`)."""
    field = CONTENTS_FIELDS[datatype_of(array.dtype)]
    flat = np.asarray(array).reshape(-1)
    if field == "bytes_contents":
        contents.bytes_contents.extend(v.encode() if isinstance(v, str) else bytes(v) for v in flat)
    else:
        getattr(contents, field).extend(flat.tolist())


# -- JSON ("data": nested or flat arrays) ---------------------------------------------------------------
def _leaves(name: str, data: Any, limit: int) -> list[Any]:
    """The values of a nested JSON array in row-major order; stops past ``limit`` (never walks more)."""
    if not isinstance(data, list):
        raise InvalidArgumentError(f"Unable to parse 'data' of input '{name}': expected an array")
    leaves: list[Any] = []
    stack = [iter(data)]
    while stack:
        item = next(stack[-1], _END)
        if item is _END:
            stack.pop()
        elif isinstance(item, list):
            stack.append(iter(item))
        else:
            leaves.append(item)
            if len(leaves) > limit:
                break
    return leaves


_END = object()


def _json_leaf(name: str, datatype: str, value: Any) -> Any:
    if datatype == "BOOL":
        if not isinstance(value, bool):
            raise _type_error(name, datatype, value)
    elif datatype in _INT_RANGES:
        low, high = _INT_RANGES[datatype]
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise _type_error(name, datatype, value)
    elif datatype == "BYTES":
        if not isinstance(value, str):
            raise _type_error(name, datatype, value)
        return value.encode("utf-8", "surrogatepass")  # JSON allows lone surrogates ("\ud800")
    elif isinstance(value, bool) or not isinstance(value, int | float):
        raise _type_error(name, datatype, value)
    return value


def _type_error(name: str, datatype: str, value: Any) -> InvalidArgumentError:
    shown = repr(value)
    shown = shown if len(shown) <= 80 else shown[:80] + "..."
    return InvalidArgumentError(
        f"Unable to parse 'data' of input '{name}': {shown} is not a {datatype} value"
    )


def from_json(name: str, datatype: str, shape: Sequence[int], data: Any) -> np.ndarray:
    """A JSON ``data`` array (nested or flat) holding exactly the declared shape's elements."""
    if datatype == "FP16":  # as Triton: http_server.cc ReadDataFromJson
        raise InvalidArgumentError(
            f"receiving FP16 data via JSON is not supported. Please use the binary data format for input {name}"
        )
    count = element_count(shape)
    leaves = _leaves(name, data, count)
    if len(leaves) != count:
        raise InvalidArgumentError(
            f"Unable to parse 'data' of input '{name}': shape does not match true shape of 'data' field "
            f"({'more than ' if len(leaves) > count else ''}{len(leaves)} values, shape "
            f"{_shape_text(shape)} holds {count})"
        )
    values = [_json_leaf(name, datatype, value) for value in leaves]
    dtype = DATATYPES[datatype]
    if dtype == STRING:
        array = np.empty(count, dtype=object)
        array[:] = values
        return array.reshape(shape)
    return np.asarray(values, dtype=dtype).reshape(shape)


def to_json(array: np.ndarray) -> list[Any]:
    """A tensor's values as a flat JSON array, row-major (what Triton answers)."""
    array = np.asarray(array)
    if datatype_of(array.dtype) == "BYTES":
        return [(v if isinstance(v, str) else bytes(v).decode("utf-8", "replace")) for v in array.reshape(-1)]
    return array.reshape(-1).tolist()
