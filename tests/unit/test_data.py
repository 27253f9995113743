import gzip
import struct

import numpy as np
import pytest

from training import data
from training.data import DatasetError, load_mnist, parse_idx


def _idx(array: np.ndarray, code: int = 0x08) -> bytes:
    header = struct.pack(">HBB", 0, code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write_split(directory, images, labels, image_name=data.TEST_IMAGES, label_name=data.TEST_LABELS):
    (directory / image_name).write_bytes(gzip.compress(_idx(images)))
    (directory / label_name).write_bytes(gzip.compress(_idx(labels)))


def test_shipped_mnist_loads_with_standard_sizes():
    mnist = load_mnist()
    assert mnist.train.images.shape == (60000, 28, 28) and mnist.train.images.dtype == np.uint8
    assert mnist.test.images.shape == (10000, 28, 28)
    assert sorted(set(mnist.test.labels.tolist())) == list(range(10))
    assert mnist.test.labels[:4].tolist() == [7, 2, 1, 0]  # the well-known first test digits


def test_parse_idx_roundtrip():
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    np.testing.assert_array_equal(parse_idx(_idx(array)), array)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"\x00\x00", "too short"),
        (b"\x12\x34\x08\x01" + b"\x00" * 8, "not an IDX file"),
        (b"\x00\x00\x08\x03\x00\x00", "truncated header"),
        (_idx(np.zeros((2, 2), np.uint8))[:-1], "truncated"),
        (_idx(np.zeros((2, 2), np.uint8)) + b"\x00", "trailing bytes"),
    ],
)
def test_parse_idx_rejects_corrupt_buffers(raw, message):
    with pytest.raises(DatasetError, match=message):
        parse_idx(raw, "x.idx")


def test_missing_directory_names_the_file(tmp_path):
    with pytest.raises(DatasetError, match=r"cannot read .*train-images-idx3-ubyte.gz"):
        load_mnist(tmp_path)


def test_truncated_gzip_is_a_clear_error(tmp_path):
    source = data.DEFAULT_DATA_DIR
    for name in (data.TRAIN_IMAGES, data.TRAIN_LABELS, data.TEST_IMAGES, data.TEST_LABELS):
        (tmp_path / name).write_bytes((source / name).read_bytes())
    blob = (tmp_path / data.TRAIN_LABELS).read_bytes()
    (tmp_path / data.TRAIN_LABELS).write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DatasetError, match="not a complete gzip file"):
        load_mnist(tmp_path)


def test_short_idx_file_inside_valid_gzip(tmp_path):
    images = np.zeros((5, 28, 28), np.uint8)
    raw = _idx(images)[:-100]
    (tmp_path / data.TRAIN_IMAGES).write_bytes(gzip.compress(raw))
    with pytest.raises(DatasetError, match="truncated"):
        data.load_idx_file(str(tmp_path), data.TRAIN_IMAGES)


def test_label_count_mismatch(tmp_path):
    _write_split(tmp_path, np.zeros((3, 28, 28)), np.zeros(2), data.TRAIN_IMAGES, data.TRAIN_LABELS)
    with pytest.raises(DatasetError, match="3 images but .* 2 labels"):
        data._load_split(str(tmp_path), data.TRAIN_IMAGES, data.TRAIN_LABELS)


def test_wrong_image_shape_and_bad_labels(tmp_path):
    _write_split(tmp_path, np.zeros((3, 20, 20)), np.zeros(3))
    with pytest.raises(DatasetError, match=r"expected uint8 images \[N,28,28\]"):
        data._load_split(str(tmp_path), data.TEST_IMAGES, data.TEST_LABELS)
    _write_split(tmp_path, np.zeros((3, 28, 28)), np.array([1, 2, 12]))
    with pytest.raises(DatasetError, match="label 12 is not a digit"):
        data._load_split(str(tmp_path), data.TEST_IMAGES, data.TEST_LABELS)


def test_shards_are_disjoint_and_cover_the_split():
    split = load_mnist().test.head(101)
    shards = [split.shard(i, 2) for i in range(2)]
    assert len(shards[0]) + len(shards[1]) == 101
    np.testing.assert_array_equal(shards[1].labels, split.labels[1::2])
    with pytest.raises(ValueError):
        split.shard(2, 2)
