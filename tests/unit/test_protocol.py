"""ray_app.protocol: TF Serving's messages without TensorFlow, TensorProto <-> numpy, the status table."""

from __future__ import annotations

import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ray_app.protocol.protos import predict_pb2, tensor_pb2, types_pb2
from ray_app.protocol.status import (
    GRPC_TO_HTTP,
    HTTP_TO_GRPC,
    InvalidArgumentError,
    ResourceExhaustedError,
    ServingError,
    StatusCode,
)
from ray_app.protocol.tensors import from_ndarray, tf_dtype_string, to_ndarray

REPO = Path(__file__).resolve().parents[2]


def _run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=180)


# -- the generated modules ----------------------------------------------------------------------
def test_client_side_imports_load_no_tensorflow_ray_or_fastapi() -> None:
    # What keeps the CLI's start-up at ~0.2 s (against 3.4 s with TensorFlow): none of these load.
    result = _run_python(
        "import sys\n"
        "import client.grpc_client, client.transport, ray_app.protocol.protos, ray_app.protocol.tensors\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'tensorflow', 'ray', 'fastapi', 'keras'}))\n"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_generated_modules_match_the_installed_tf_serving() -> None:
    from ray_app.protocol.generate import stale_files

    assert stale_files() == []  # regenerate with: python -m ray_app.protocol.generate


@pytest.mark.parametrize("tf_first", [False, True], ids=["ours-first", "tensorflow-first"])
def test_ours_and_tf_servings_modules_share_messages_in_either_order(tf_first: bool) -> None:
    ours = "from ray_app.protocol.protos import predict_pb2 as ours\n"
    theirs = "from tensorflow_serving.apis import predict_pb2 as theirs\nimport tensorflow as tf\n"
    result = _run_python(
        (theirs + ours if tf_first else ours + theirs)
        + "assert ours.PredictRequest is theirs.PredictRequest\n"
        "request = ours.PredictRequest()\n"
        "request.inputs['x'].CopyFrom(tf.make_tensor_proto([1.0, 2.0]))\n"
        "print(tf.make_ndarray(request.inputs['x']).tolist())\n"
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[1.0, 2.0]"


# -- TensorProto <-> numpy ----------------------------------------------------------------------
ARRAYS = [
    np.arange(6, dtype=np.float32).reshape(2, 3) / 7,
    np.arange(6, dtype=np.float64).reshape(3, 2) / 3,
    np.array([[0.5, -2.25]], dtype=np.float16),
    np.array([0, 7, 255], dtype=np.uint8),
    np.array([-128, 127], dtype=np.int8),
    np.array([-(2**15), 2**15 - 1], dtype=np.int16),
    np.array([0, 2**16 - 1], dtype=np.uint16),
    np.array([-(2**31), 2**31 - 1], dtype=np.int32),
    np.array([-(2**63), 2**63 - 1], dtype=np.int64),
    np.array([2**32 - 1], dtype=np.uint32),
    np.array([2**64 - 1], dtype=np.uint64),
    np.array([True, False]),
    np.array([b"\x89PNG\x00", b""], dtype=object),
    np.zeros((0, 28, 28), dtype=np.uint8),
]


@pytest.mark.parametrize("array", ARRAYS, ids=lambda a: f"{a.dtype}{list(a.shape)}")
@pytest.mark.parametrize("tensor_content", [False, True], ids=["typed-fields", "tensor-content"])
def test_round_trip_in_both_encodings(array: np.ndarray, tensor_content: bool) -> None:
    proto = from_ndarray(array, tensor_content=tensor_content)
    decoded = to_ndarray(tensor_pb2.TensorProto.FromString(proto.SerializeToString()))
    assert decoded.dtype == array.dtype and decoded.shape == array.shape
    assert decoded.tolist() == array.tolist()


def test_answers_use_tf_servings_typed_fields_by_default() -> None:
    probabilities = from_ndarray(np.array([[0.25, 0.75]], dtype=np.float32))
    classes = from_ndarray(np.array([1], dtype=np.int64))
    assert list(probabilities.float_val) == [0.25, 0.75] and not probabilities.tensor_content
    assert list(classes.int64_val) == [1] and [d.size for d in probabilities.tensor_shape.dim] == [1, 2]
    assert (probabilities.dtype, classes.dtype) == (types_pb2.DT_FLOAT, types_pb2.DT_INT64)


def _proto(dtype: int, shape: list[int], **values) -> tensor_pb2.TensorProto:
    proto = tensor_pb2.TensorProto(dtype=dtype, **values)
    for size in shape:
        proto.tensor_shape.dim.add(size=size)
    return proto


def test_typed_values_follow_tensorflows_from_proto() -> None:
    """Fewer values are padded with the last one, none means zeros, extra ones are ignored, and
    narrow integer types are cast like C++ (TensorFlow's Tensor::FromProto)."""
    padded = to_ndarray(_proto(types_pb2.DT_UINT8, [2, 2], int_val=[3, 300]))
    assert padded.tolist() == [[3, 44], [44, 44]]
    assert to_ndarray(_proto(types_pb2.DT_FLOAT, [3])).tolist() == [0.0, 0.0, 0.0]
    assert to_ndarray(_proto(types_pb2.DT_INT64, [2], int64_val=[1, 2, 3])).tolist() == [1, 2]
    assert to_ndarray(_proto(types_pb2.DT_STRING, [3], string_val=[b"a"])).tolist() == [b"a"] * 3


@pytest.mark.parametrize(
    "proto",
    [
        _proto(types_pb2.DT_FLOAT, [2], tensor_content=b"\x00" * 7),  # 7 bytes for 2 floats
        _proto(types_pb2.DT_INVALID, [1]),
        _proto(12345, [1]),
    ],
)
def test_what_tensorflow_cannot_parse_is_a_tensor_parsing_error(proto) -> None:
    with pytest.raises(InvalidArgumentError, match="^tensor parsing error: images$"):
        to_ndarray(proto, "images")


@pytest.mark.parametrize(
    "proto",
    [
        _proto(types_pb2.DT_UINT8, [4_000_000, 28, 28], int_val=[1]),  # the 60-byte, 3.1 GB request
        _proto(types_pb2.DT_DOUBLE, [2_000_000_000, 28, 28], double_val=[1.0]),
        _proto(types_pb2.DT_FLOAT, [2**62, 2**62, 2**62]),  # more than int64 can count
    ],
)
def test_declared_sizes_are_refused_before_allocation(proto) -> None:
    tracemalloc.start()
    try:
        with pytest.raises(ResourceExhaustedError, match="the limit is 802816"):
            to_ndarray(proto, "images", max_elements=1024 * 784)
        _, peak_bytes = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(proto.SerializeToString()) < 100
    assert peak_bytes < 64 * 1024


_DTYPE_VALUES = st.sampled_from(sorted(types_pb2.DataType.values()) + [-1, 999])


@st.composite
def tensor_protos(draw) -> tensor_pb2.TensorProto:
    proto = tensor_pb2.TensorProto(dtype=draw(_DTYPE_VALUES) % 2**31)
    for size in draw(st.lists(st.integers(-2, 2**40), max_size=5)):
        proto.tensor_shape.dim.add(size=size)
    proto.tensor_shape.unknown_rank = draw(st.booleans()) and draw(st.booleans())
    proto.tensor_content = draw(st.binary(max_size=64))
    proto.float_val.extend(draw(st.lists(st.floats(width=32), max_size=8)))
    proto.int_val.extend(draw(st.lists(st.integers(-(2**31), 2**31 - 1), max_size=8)))
    proto.int64_val.extend(draw(st.lists(st.integers(-(2**63), 2**63 - 1), max_size=4)))
    proto.string_val.extend(draw(st.lists(st.binary(max_size=8), max_size=4)))
    proto.half_val.extend(draw(st.lists(st.integers(0, 2**16 - 1), max_size=4)))
    return proto


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(proto=tensor_protos(), max_elements=st.integers(0, 4096))
def test_any_tensor_proto_decodes_or_gets_a_clean_status_within_its_limit(proto, max_elements) -> None:
    tracemalloc.start()
    try:
        array = to_ndarray(proto, "x", max_elements=max_elements)
    except ServingError as exc:
        assert exc.code in (StatusCode.INVALID_ARGUMENT, StatusCode.RESOURCE_EXHAUSTED), exc
        array = None
    finally:
        _, peak_bytes = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    if array is not None:
        assert array.size <= max_elements
    assert peak_bytes < 64 * 1024 + 16 * max_elements  # bounded by the limit, whatever is declared


@settings(max_examples=200, deadline=None)
@given(raw=st.binary(max_size=256))
def test_arbitrary_bytes_parse_or_fail_cleanly_as_a_predict_request(raw: bytes) -> None:
    from google.protobuf.message import DecodeError

    try:
        request = predict_pb2.PredictRequest.FromString(raw)
    except DecodeError:
        return
    for name, tensor in request.inputs.items():
        try:
            to_ndarray(tensor, name, max_elements=1024)
        except ServingError as exc:
            assert exc.code is not StatusCode.INTERNAL


def test_tf_dtype_names_are_tensorflows() -> None:
    assert [tf_dtype_string(d) for d in (types_pb2.DT_FLOAT, types_pb2.DT_UINT8, types_pb2.DT_STRING)] == [
        "float",
        "uint8",
        "string",
    ]


# -- the status table ---------------------------------------------------------------------------
def test_status_table_is_tf_servings_both_ways() -> None:
    assert GRPC_TO_HTTP[StatusCode.INVALID_ARGUMENT] == 400
    assert GRPC_TO_HTTP[StatusCode.FAILED_PRECONDITION] == 400
    assert GRPC_TO_HTTP[StatusCode.NOT_FOUND] == 404
    assert GRPC_TO_HTTP[StatusCode.RESOURCE_EXHAUSTED] == 429
    assert GRPC_TO_HTTP[StatusCode.UNAVAILABLE] == 503
    assert GRPC_TO_HTTP[StatusCode.DEADLINE_EXCEEDED] == 504
    for status, code in HTTP_TO_GRPC.items():
        assert GRPC_TO_HTTP[code] == status or (status, code) == (413, StatusCode.RESOURCE_EXHAUSTED)


def test_typed_values_decode_without_a_python_list_of_them() -> None:
    """A uint8 input sent as int_val (a varint per pixel): the decoded tensor plus an int32
    intermediate, not a Python list of ints (8-36 bytes each) first (issue 15)."""
    count = 1024 * 28 * 28
    values = (np.arange(count) % 300).astype(np.int32)  # most above the small-int cache
    proto = tensor_pb2.TensorProto(dtype=types_pb2.DT_UINT8)
    for size in (1024, 28, 28):
        proto.tensor_shape.dim.add(size=size)
    proto.int_val.extend(values.tolist())
    tracemalloc.start()
    try:
        array = to_ndarray(proto, "images", max_elements=count)
        _, peak_bytes = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert np.array_equal(array.reshape(-1), values.astype(np.uint8))  # wrapped like C++ casts
    assert peak_bytes < 6 * count, peak_bytes
