"""Untrusted JSON -> tensors under limits: the security boundary of the REST front door.

What a body may cost is bounded before the work is done (``docs/limits.md``):

1. :func:`check_composites` counts the lists, objects and strings of the raw bytes (three
   ``bytes.count`` calls, no parse) against ``max_json_composites``: those are what make a parsed
   document cost tens of bytes per body byte (``[[0],[0],...]`` is ~90 bytes of Python objects per
   4 bytes of JSON). Numbers cost at most ~8 bytes of objects per body byte.
2. :func:`parse` uses ``orjson`` (2-3x faster than ``json`` here, bench/README.md) and falls back
   to the standard library only to produce TF Serving's (RapidJSON's) error texts, or for what
   orjson refuses and ``json`` accepts (``NaN``, invalid UTF-8, lone surrogates).
3. :func:`outline` reads a value's shape from its first elements only; the caller checks it
   against the signature and the limits (leading dimension, element count) before conversion.
4. :func:`to_tensor` then walks the lists level by level with C-level iteration (``map``,
   ``itertools.chain``) to prove the nesting rectangular and collect the leaves' types, and
   converts straight to the signature's dtype with ``np.fromiter``: no promotion of a stray
   string to fixed-width unicode (84 bytes per element), no Python loop per element. Only the
   error path builds object arrays to find the value TF Serving names, also without a Python loop
   per element.

Texts follow TF Serving's ``util/json_tensor.cc`` (tests/unit/test_rest_api.py pins them).
"""

from __future__ import annotations

import base64
import binascii
import itertools
import json
import re
from typing import Any

import numpy as np
import orjson

from ray_app.protocol.protos import types_pb2
from ray_app.protocol.status import InvalidArgumentError, ResourceExhaustedError, UnimplementedError
from ray_app.protocol.tensors import STRING, element_count, tf_dtype_string
from ray_app.signatures import TensorSpec

MAX_ECHOED_CHARS = 1000
_MAX_DIMS = 64  # numpy's limit (TensorFlow's is 254)
_MAX_ECHO_DEPTH = 100  # echoes stop descending here (a parsed document may nest ~1,000 deep)

_RAPIDJSON_TEXT = {  # Python's json messages -> RapidJSON's (what TF Serving quotes)
    "Expecting value": "Invalid value.",
    "Expecting property name enclosed in double quotes": "Missing a name for object member.",
    "Expecting ':' delimiter": "Missing a colon after a name of object member.",
    "Extra data": "The document root must not be followed by other values.",
    "Unterminated string starting at": "Missing a closing quotation mark in string.",
    "Invalid \\escape": "Invalid escape character in string.",
    "Invalid \\uXXXX escape": "Incorrect hex digit after \\u escape in string.",
    "Invalid control character at": "Invalid encoding in string.",
}
_ESCAPE = re.compile(rb"\\.", re.S)  # a backslash and the character it escapes
_STRING = re.compile(rb'"[^"]*"')  # a string, once escapes are gone
_NOT_STRUCTURE = bytes(set(range(256)) - set(b'"[]{}'))
_OPEN = frozenset(b"[{")


# -- bytes -> document ---------------------------------------------------------------------------
def composites(body: bytes) -> int:
    """Lists, objects and strings the body can hold at most (brackets and quotes inside strings
    count too: an over-estimate, never an under-estimate)."""
    return body.count(b"[") + body.count(b"{") + body.count(b'"') // 2


def check_composites(body: bytes, max_composites: int) -> None:
    """RESOURCE_EXHAUSTED when parsing the body would build more than ``max_composites`` containers
    and strings (``Limits.max_json_composites``), checked on the raw bytes before parsing."""
    count = composites(body)
    if count > max_composites:
        raise ResourceExhaustedError(
            f"the JSON body holds up to {count} lists, objects and strings; the limit is "
            f"max_json_composites ({max_composites})",
            "max_json_composites",
        )


def parse(body: bytes) -> Any:
    """The request document; TF Serving's "JSON Parse error: ..." (400) when it is not JSON."""
    if not body:
        raise InvalidArgumentError("JSON Parse error: The document is empty")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        pass  # the standard parser gives the error text, or accepts what orjson does not
    text = body.decode("utf-8", "surrogateescape")  # RapidJSON does not validate UTF-8 either
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        message = _RAPIDJSON_TEXT.get(exc.msg, exc.msg)
        if exc.msg == "Expecting ',' delimiter":
            message = _comma_text(text, exc.pos)
        raise InvalidArgumentError(f"JSON Parse error: {message} at offset: {exc.pos}") from None
    except RecursionError:
        raise InvalidArgumentError("JSON Parse error: the document nests too deep") from None


def _comma_text(text: str, position: int) -> str:
    """RapidJSON names the container a missing comma belongs to: the innermost open one.

    Escapes, then everything but quotes and brackets, then strings are removed by C-level passes
    (``re.sub``, ``bytes.translate``); the loop runs once per bracket, which
    :func:`check_composites` bounds, not once per character."""
    prefix = _ESCAPE.sub(b"", text[:position].encode("utf-8", "surrogateescape"))
    skeleton = _STRING.sub(b"", prefix.translate(None, _NOT_STRUCTURE))
    stack: list[int] = []
    for byte in skeleton:
        if byte in _OPEN:
            stack.append(byte)
        elif stack:
            stack.pop()
    if stack and stack[-1] == ord("["):
        return "Missing a comma or ']' after an array element."
    return "Missing a comma or '}' after an object member."


# -- echoes and type names ------------------------------------------------------------------------
def echo(value: Any, budget: int = MAX_ECHOED_CHARS) -> str:
    """One JSON value as compact JSON, cut to ``budget`` characters; costs O(budget), whatever the
    value's size (only as many elements are rendered as fit)."""
    parts: list[str] = []
    left = [budget + 1]

    def put(text: str) -> bool:
        parts.append(text)
        left[0] -= len(text)
        return left[0] > 0

    def walk(item: Any, depth: int) -> bool:
        if depth > _MAX_ECHO_DEPTH and isinstance(item, list | dict):
            put("...")
            return False
        if isinstance(item, list):
            if not put("["):
                return False
            for index, element in enumerate(item):
                if (index and not put(",")) or not walk(element, depth + 1):
                    return False
            return put("]")
        if isinstance(item, dict):
            if not put("{"):
                return False
            for index, (key, element) in enumerate(item.items()):
                if (index and not put(",")) or not put(json.dumps(key, ensure_ascii=False) + ":"):
                    return False
                if not walk(element, depth + 1):
                    return False
            return put("}")
        return put(json.dumps(item, ensure_ascii=False))

    walk(value, 0)
    text = "".join(parts)
    return text if len(text) <= budget else text[:budget] + "...(cut)"


def json_type(value: Any) -> str:
    """RapidJSON's type name of a parsed value (what TF Serving's type errors say)."""
    if value is None:
        return "Null"
    if value is True:
        return "True"
    if value is False:
        return "False"
    if isinstance(value, dict):
        return "Object"
    if isinstance(value, list):
        return "Array"
    return "String" if isinstance(value, str) else "Number"


def _type_error(value: Any, spec: TensorSpec) -> InvalidArgumentError:
    return InvalidArgumentError(
        f"JSON Value: {echo(value)} Type: {json_type(value)} is not of expected type: "
        f"{tf_dtype_string(spec.tf_dtype)}"
    )


# -- outline --------------------------------------------------------------------------------------
def outline(value: Any) -> tuple[int, ...]:
    """The shape nested lists suggest, following first elements only (O(depth), no full walk)."""
    dims = []
    while isinstance(value, list):
        dims.append(len(value))
        value = value[0] if value else None
    return tuple(dims)


def _ragged_error(alias: str, value: Any) -> InvalidArgumentError:
    """TF Serving's text for the first top-level element whose shape differs from the first's.
    The caller has bounded the leading dimension: one outline per top-level element."""
    if isinstance(value, list) and value:
        first = outline(value[0])
        for index, element in enumerate(value):
            got = outline(element)
            if got != first:
                return InvalidArgumentError(
                    f"Failed to process element: {index} of 'instances' list. Error: INVALID_ARGUMENT: "
                    f"Expecting shape [{','.join(map(str, first))}] but got: [{','.join(map(str, got))}]"
                )
    return InvalidArgumentError(f"input {alias!r}: the JSON lists are not a rectangular tensor")


def _last_level(alias: str, value: Any, shape: tuple[int, ...]) -> list:
    """The lists that hold the leaves, once every level is proven to be lists of the outline's
    length (C-level ``map``/``chain`` per level; no Python loop per element)."""
    level = [value]
    for size in shape[1:]:
        level = list(itertools.chain.from_iterable(level))
        if set(map(type, level)) != {list} or set(map(len, level)) != {size}:
            raise _ragged_error(alias, value)
    return level


# -- leaves -> array ------------------------------------------------------------------------------
# JSON integer ranges by dtype (RapidJSON's IsInt / IsInt64 / IsUint / IsUint64), and the largest
# integer a float type holds exactly (TF Serving refuses integers beyond it).
_INT32 = (-(2**31), 2**31 - 1)
_INT_RANGES = {
    types_pb2.DT_INT32: _INT32,
    types_pb2.DT_INT16: _INT32,
    types_pb2.DT_INT8: _INT32,
    types_pb2.DT_UINT8: _INT32,
    types_pb2.DT_UINT16: _INT32,
    types_pb2.DT_INT64: (-(2**63), 2**63 - 1),
    types_pb2.DT_UINT32: (0, 2**32 - 1),
    types_pb2.DT_UINT64: (0, 2**64 - 1),
}
_EXACT_INT = {types_pb2.DT_FLOAT: (2**24 - 1, "float"), types_pb2.DT_DOUBLE: (2**53 - 1, "double")}


def _allowed_types(tf_dtype: int) -> frozenset[type]:
    if tf_dtype in _EXACT_INT:
        return frozenset((int, float))
    if tf_dtype in _INT_RANGES:
        return frozenset((int,))
    return frozenset((bool,))


def _check_leaf(value: Any, spec: TensorSpec) -> None:
    """TF Serving's ``AddValueToTensor`` checks on one JSON value."""
    dtype = spec.tf_dtype
    if dtype in _EXACT_INT:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _type_error(value, spec)
        limit, kind = _EXACT_INT[dtype]
        if isinstance(value, int) and abs(value) > limit:
            raise InvalidArgumentError(
                f"Cannot convert JSON value: {value} to {kind} without loss of precision."
            )
    elif dtype in _INT_RANGES:
        low, high = _INT_RANGES[dtype]
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise _type_error(value, spec)
    elif dtype == types_pb2.DT_BOOL:
        if not isinstance(value, bool):
            raise _type_error(value, spec)


def _first_bad_leaf(leaves: list, spec: TensorSpec) -> None:
    """Raise TF Serving's error for the first leaf it would refuse; return if there is none.

    Vectorised over object arrays (a C loop per element), never a Python loop per element."""
    count = len(leaves)
    values = np.empty(count, dtype=object)
    values[:] = leaves
    types = np.fromiter(map(type, leaves), dtype=object, count=count)
    good = np.zeros(count, dtype=bool)
    for kind in _allowed_types(spec.tf_dtype):
        good |= types == kind
    bad = ~good
    if spec.tf_dtype in _INT_RANGES:
        low, high = _INT_RANGES[spec.tf_dtype]
        typed = values[good]
        bad[good] = (typed < low) | (typed > high)
    elif spec.tf_dtype in _EXACT_INT:
        limit = _EXACT_INT[spec.tf_dtype][0]
        ints = types == int  # noqa: E721 (elementwise, over an array of types)
        typed = values[ints]
        bad[ints] = (typed < -limit) | (typed > limit)
    if bad.any():
        _check_leaf(leaves[int(bad.argmax())], spec)


def _numbers(leaves, count: int, types: set[type], spec: TensorSpec) -> np.ndarray | None:
    """The leaves (of allowed Python types) straight into the signature's dtype; None when a
    value may be out of range (the caller then names it, or accepts it)."""
    dtype = spec.tf_dtype
    try:
        if dtype in _EXACT_INT:
            with np.errstate(over="ignore"):  # a double beyond float's range is inf, as in C++
                array = np.fromiter(leaves(), dtype=spec.dtype, count=count)
            # an integer beyond 2**24 (2**53) rounds to at least that: only then look closer
            if int in types and np.abs(array).max() > _EXACT_INT[dtype][0]:
                return None
            return array
        if dtype in _INT_RANGES:
            low, high = _INT_RANGES[dtype]
            try:
                return np.fromiter(leaves(), dtype=spec.dtype, count=count)  # numpy refuses out of range
            except OverflowError:
                info = np.iinfo(spec.dtype)
                if info.min <= low and info.max >= high:
                    return None  # out of the JSON range too
            # narrow types take int32's range and wrap, like TF Serving's C++ casts
            wide = np.fromiter(leaves(), dtype=np.int64, count=count)
            if wide.min() < low or wide.max() > high:
                return None
            return wide.astype(spec.dtype)
        return np.fromiter(leaves(), dtype=np.bool_, count=count)
    except OverflowError:
        return None


def _string_leaf(value: Any, spec: TensorSpec) -> bytes:
    if isinstance(value, str):
        return value.encode("utf-8", "surrogateescape")
    if isinstance(value, dict) and "b64" in value:
        if len(value) != 1 or not isinstance(value["b64"], str):
            raise InvalidArgumentError(f"JSON Value: {echo(value)} not formatted correctly for base64 data")
        try:
            return base64.b64decode(value["b64"], validate=True)
        except (binascii.Error, ValueError):
            raise InvalidArgumentError("Unable to base64 decode") from None
    raise _type_error(value, spec)


def to_tensor(alias: str, value: Any, spec: TensorSpec, max_elements: int) -> np.ndarray:
    """One input's JSON value -> an array of the signature's dtype (TF Serving's conversions).

    The value's :func:`outline` is checked against ``max_elements`` first (callers check it
    against the signature too), so the work below is bounded by the limits.
    """
    shape = outline(value)
    count = element_count(shape)
    if spec.dtype is None or spec.tf_dtype == types_pb2.DT_HALF:
        raise UnimplementedError(
            f"Conversion of JSON Value: {echo(value)} to type: {tf_dtype_string(spec.tf_dtype)}"
        )
    if len(shape) > _MAX_DIMS:
        raise InvalidArgumentError(
            f"input {alias!r}: the JSON lists nest {len(shape)} deep; a tensor has at most {_MAX_DIMS} dimensions"
        )
    if count > max_elements:
        raise ResourceExhaustedError(
            f"input {alias!r} of shape {list(shape)} has {count} elements; the limit is {max_elements}",
            "max_request_bytes" if spec.dtype != STRING else "max_images_per_request",
        )
    if not shape:
        last: list = [[value]]
    else:
        last = _last_level(alias, value, shape)

    def leaves():
        return itertools.chain.from_iterable(last)

    types = set(map(type, leaves()))
    if list in types:  # a leaf deeper than the first element's nesting
        raise _ragged_error(alias, value)
    if spec.dtype == STRING:
        array = np.empty(count, dtype=object)
        array[:] = [_string_leaf(leaf, spec) for leaf in leaves()]  # count <= max_images_per_request
        return array.reshape(shape)
    if count == 0:
        return np.zeros(shape, dtype=spec.dtype)
    array = _numbers(leaves, count, types, spec) if types <= _allowed_types(spec.tf_dtype) else None
    if array is None:
        flat = list(leaves())
        _first_bad_leaf(flat, spec)
        with np.errstate(over="ignore"):  # only floats beyond 2**24 were in doubt: they are fine
            array = np.array(flat, dtype=spec.dtype)
    return array.reshape(shape)
