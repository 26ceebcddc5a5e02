"""TensorFlow Datasets behind ``"tfds:<name>"`` specs: read a prepared dataset, or check that it
can be prepared here (TensorFlow installed, the download host reachable) before trying."""

from __future__ import annotations

import importlib.util
import os
import socket
import urllib.parse
from typing import Any

import numpy as np

from experiments.data.dataset import Dataset, MissingDependencyError, bytes_to_unit_float

SPEC_FORMS = (
    '"embedded:mnist", "embedded:digits", "idx:<dir>" (or "idx" with data_dir=<dir>), '
    '"fortunes:<language>" (en, de, es, it), '
    '"tfds:<name>" (e.g. "tfds:mnist", "tfds:fashion_mnist", "tfds:kmnist", "tfds:cifar10")'
)
OFFLINE_ALTERNATIVES = (
    'use a spec that needs no download: "embedded:mnist" (5,000 real MNIST digits) or '
    '"idx:/usr/share/datasets/fashion-mnist" (Debian package dataset-fashion-mnist)'
)
_PROBE_TIMEOUT_S = 2.0


def load_tfds(name: str, data_dir: str | os.PathLike[str] | None) -> Dataset:
    """Reads the train and test splits of a TFDS image dataset, preparing it first if needed."""
    try:
        import tensorflow_datasets as tfds
    except ImportError as error:
        raise MissingDependencyError(
            f'Spec "tfds:{name}" needs tensorflow-datasets: pip install "ewc-jax[tfds]" '
            f'(and "ewc-jax[tfds-online]" to download and prepare it). Or {OFFLINE_ALTERNATIVES}.'
        ) from error
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as error:
        raise ValueError(
            f'Spec "tfds:{name}": TFDS has no dataset {name!r} (see tfds.list_builders()); '
            f"valid spec forms are {SPEC_FORMS}."
        ) from error
    if not builder.is_prepared():
        _check_tfds_can_prepare(builder, name)
        # ArrayRecord files can later be read without TensorFlow, through tfds data sources.
        builder.download_and_prepare(file_format="array_record")
    if builder.info.supervised_keys is None:
        raise ValueError(f'"tfds:{name}" has no supervised (image, label) keys to read.')
    image_key, label_key = builder.info.supervised_keys
    missing = {"train", "test"} - set(builder.info.splits)
    if missing:
        raise ValueError(
            f'"tfds:{name}" has splits {sorted(builder.info.splits)}; it needs train and test.'
        )
    arrays = {
        split: _read_tfds_split(tfds, builder, split, image_key, label_key)
        for split in ("train", "test")
    }
    return Dataset(
        name=f"tfds:{name}",
        train_images=arrays["train"][0],
        train_labels=arrays["train"][1],
        test_images=arrays["test"][0],
        test_labels=arrays["test"][1],
        num_classes=builder.info.features[label_key].num_classes,
    )


def _read_tfds_split(
    tfds: Any, builder: Any, split: str, image_key: str, label_key: str
) -> tuple[np.ndarray, np.ndarray]:
    """One split as (float32 images in [0, 1], int32 labels)."""
    if builder.info.file_format == tfds.core.FileFormat.ARRAY_RECORD:
        source = builder.as_data_source(split=split)
        examples = source.__getitems__(range(len(source)))
        images = np.stack([example[image_key] for example in examples])
        labels = np.array([example[label_key] for example in examples])
    elif _tensorflow_installed():
        batch = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
        images, labels = batch[image_key], batch[label_key]
    else:
        raise MissingDependencyError(
            f'"tfds:{builder.name}" is prepared in {builder.data_path} in the '
            f"{builder.info.file_format.value} format, which TFDS reads only with TensorFlow "
            '(not installed). pip install "ewc-jax[tfds-online]" (tensorflow-cpu), or prepare '
            "the dataset again with "
            f'file_format="array_record", or {OFFLINE_ALTERNATIVES}.'
        )
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(
            f'"tfds:{builder.name}" {split} {image_key!r} is {images.dtype} '
            f"{list(images.shape)}; expected uint8 images [N, H, W, C]."
        )
    return bytes_to_unit_float(images), labels.astype(np.int32)


def _check_tfds_can_prepare(builder: Any, name: str) -> None:
    """Fails fast where TFDS would otherwise retry a download for minutes or fail after it."""
    if not _tensorflow_installed():
        raise MissingDependencyError(
            f'"tfds:{name}" is not prepared in {builder.data_path}, and TFDS needs TensorFlow to '
            "prepare it (it encodes the images with TensorFlow), which is not installed. "
            'pip install "ewc-jax[tfds-online]" (tensorflow-cpu, ~1.6 GB); or prepare it elsewhere '
            "with "
            f'tfds.builder("{name}").download_and_prepare(file_format="array_record") and copy '
            f"the data dir here; or {OFFLINE_ALTERNATIVES}."
        )
    host = _download_host(builder)
    if not _host_reachable(host):
        raise ConnectionError(
            f'"tfds:{name}" is not prepared in {builder.data_path} and its download host {host} '
            f"does not answer (no internet?). Pass data_dir= where it is prepared, or "
            f"{OFFLINE_ALTERNATIVES}."
        )


def _tensorflow_installed() -> bool:
    return importlib.util.find_spec("tensorflow") is not None


def _download_host(builder: Any) -> str:
    """The host a builder downloads from: the MNIST family's ``URL``, else its homepage's host."""
    url = getattr(builder, "URL", None)
    if not isinstance(url, str):
        url = builder.info.homepage or ""
    return urllib.parse.urlparse(url).hostname or "storage.googleapis.com"


def _host_reachable(host: str) -> bool:
    """Whether a TCP connection to ``host`` (or the HTTPS proxy, if one is set) opens in 2 s."""
    proxy = urllib.request.getproxies().get("https")
    if proxy:
        parsed = urllib.parse.urlparse(proxy)
        address = (parsed.hostname or "", parsed.port or 80)
    else:
        address = (host, 443)
    try:
        with socket.create_connection(address, timeout=_PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False
