"""ray_app.protocol.oip_tensors without Ray: the OIP tensor forms against tritonclient's own encoders,
and hostile data refused with INVALID_ARGUMENT, in work and memory bounded by the declared shape."""

from __future__ import annotations

import struct
import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2
from tritonclient.utils import deserialize_bytes_tensor, serialize_byte_tensor

from ray_app.protocol import oip_tensors
from ray_app.protocol.status import ServingError, StatusCode


def test_bytes_raw_form_is_tritonclients_both_ways() -> None:
    values = np.array([b"", b"png\x00\xff", "é".encode(), b"x" * 300], dtype=object)
    client_raw = serialize_byte_tensor(values).item()
    assert oip_tensors.from_raw("b", "BYTES", [4], client_raw).tolist() == values.tolist()
    ours = oip_tensors.to_raw(values.reshape(2, 2))
    assert ours == client_raw and deserialize_bytes_tensor(ours).tolist() == values.tolist()


@pytest.mark.parametrize("datatype", ["UINT8", "INT64", "FP32", "FP64", "BOOL", "FP16", "UINT64", "INT16"])
def test_fixed_size_raw_round_trips_little_endian(datatype: str) -> None:
    dtype = oip_tensors.DATATYPES[datatype]
    array = (np.arange(12) % 2 == 0) if datatype == "BOOL" else np.arange(12).astype(dtype)
    array = array.reshape(3, 4)
    raw = oip_tensors.to_raw(array)
    assert raw == array.astype(dtype.newbyteorder("<")).tobytes()
    assert np.array_equal(oip_tensors.from_raw("t", datatype, [3, 4], raw), array)
    with pytest.raises(ServingError) as info:
        oip_tensors.from_raw("t", datatype, [3, 5], raw)
    assert info.value.code is StatusCode.INVALID_ARGUMENT and "unexpected size" in info.value.message


@pytest.mark.parametrize(
    "raw, message",
    [
        (struct.pack("<I", 5) + b"abc", "only 3 follow"),
        (b"\x01\x00", "cut short"),
        (struct.pack("<I", 1) + b"a", "1 BYTES elements, its shape holds 2"),
        ((struct.pack("<I", 1) + b"a") * 3, "more than the 2 BYTES elements"),
        (struct.pack("<I", 2**32 - 1), "declares 4294967295 bytes"),
    ],
)
def test_malformed_bytes_raw_forms_are_invalid_arguments(raw: bytes, message: str) -> None:
    with pytest.raises(ServingError) as info:
        oip_tensors.from_raw("b", "BYTES", [2], raw)
    assert info.value.code is StatusCode.INVALID_ARGUMENT and message in info.value.message


def test_json_data_nested_or_flat_and_typed() -> None:
    nested = [[1, 2, 3], [4, 5, 6]]
    flat = [1, 2, 3, 4, 5, 6]
    for data in (nested, flat):
        array = oip_tensors.from_json("x", "UINT8", [2, 3], data)
        assert array.dtype == np.uint8 and array.tolist() == nested
    assert oip_tensors.from_json("s", "BYTES", [2], ["a", "é"]).tolist() == [b"a", "é".encode()]
    assert oip_tensors.from_json("f", "FP32", [2], [1, 2.5]).tolist() == [1.0, 2.5]
    for datatype, data, text in [
        ("UINT8", [1, 256], "256 is not a UINT8 value"),
        ("INT32", [1, True], "True is not a INT32 value"),
        ("FP32", [1, "2"], "'2' is not a FP32 value"),
        ("BOOL", [1, 0], "1 is not a BOOL value"),
        ("BYTES", ["a", 1], "1 is not a BYTES value"),
        ("UINT8", [1, 2, 3], "shape does not match true shape"),
        ("UINT8", 7, "expected an array"),
        ("FP16", [1.0, 2.0], "FP16 data via JSON is not supported"),
    ]:
        with pytest.raises(ServingError) as info:
            oip_tensors.from_json("x", datatype, [2], data)
        assert info.value.code is StatusCode.INVALID_ARGUMENT and text in info.value.message, info.value


def test_typed_contents_need_one_value_per_element_and_in_range() -> None:
    contents = service_pb2.InferTensorContents(uint_contents=[1, 2, 300])
    with pytest.raises(ServingError, match="out of range for UINT8"):
        oip_tensors.from_contents("x", "UINT8", [3], contents)
    with pytest.raises(ServingError, match="unexpected number of values"):
        oip_tensors.from_contents("x", "UINT16", [4], contents)
    assert oip_tensors.from_contents("x", "UINT16", [3], contents).tolist() == [1, 2, 300]
    out = service_pb2.InferTensorContents()
    oip_tensors.to_contents(np.array([[1.5, 2.0]], np.float32), out)
    assert list(out.fp32_contents) == [1.5, 2.0]
    with pytest.raises(ServingError, match="must be sent in raw_input_contents"):
        oip_tensors.from_contents("x", "FP16", [1], out)


def test_negative_or_non_integer_dimensions_are_refused() -> None:
    for shape in ([1, -1], [1.5], [True], ["3"]):
        with pytest.raises(ServingError, match="invalid dimensions"):
            oip_tensors.check_shape("x", shape)
    assert oip_tensors.check_shape("x", [0, 3]) == (0, 3)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=st.binary(max_size=256), count=st.integers(0, 8))
def test_arbitrary_bytes_raw_data_is_decoded_or_refused_cleanly(raw: bytes, count: int) -> None:
    try:
        array = oip_tensors.from_raw("b", "BYTES", [count], raw)
    except ServingError as exc:
        assert exc.code is StatusCode.INVALID_ARGUMENT
    else:
        assert array.shape == (count,) and oip_tensors.to_raw(array) == raw


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=4),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=3), children, max_size=2)
    ),
    max_leaves=40,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=_JSON,
    datatype=st.sampled_from(sorted(oip_tensors.DATATYPES)),
    shape=st.lists(st.integers(0, 2**40), max_size=3),
)
def test_arbitrary_json_data_never_escapes_or_allocates_its_declared_shape(data, datatype, shape) -> None:
    """A declared shape of up to 2**120 elements against a few JSON values: refused after walking at
    most the values given (the declared size itself is the caller's check, against the limits)."""
    tracemalloc.start()
    try:
        array = oip_tensors.from_json("x", datatype, shape, data)
    except ServingError as exc:
        assert exc.code is StatusCode.INVALID_ARGUMENT
    else:
        assert list(array.shape) == shape
    finally:
        _, peak_bytes = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak_bytes < 1024 * 1024
