"""Reading MNIST-family IDX files: the byte format, its checks and the four-file layout.

An IDX file is a big-endian header (two zero bytes, a type code, the rank, one 4-byte size per
dimension) followed by the data; the images files are ``[N, rows, cols]`` unsigned bytes and the
labels files ``[N]``. :func:`read_idx` reads one file (plain or gzip) and says what is wrong
with a damaged one; :func:`read_split` finds and cross-checks a split's two files.
:func:`experiments.data.load_idx` turns them into a ``Dataset``.
"""

from __future__ import annotations

import gzip
import math
import os
import zlib
from pathlib import Path

import numpy as np

_IDX_UBYTE = 0x08
_IDX_MAGIC_LABELS = 0x00000801
_IDX_MAGIC_IMAGES = 0x00000803
_IDX_TYPE_NAMES = {
    0x08: "unsigned byte",
    0x09: "signed byte",
    0x0B: "int16",
    0x0C: "int32",
    0x0D: "float32",
    0x0E: "float64",
}


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Reads an unsigned-byte IDX file (plain or gzip-compressed) into a uint8 array.

    The IDX format (LeCun's MNIST page) is a big-endian header, two zero bytes, a data type byte
    (0x08 = unsigned byte), the number of dimensions d and d uint32 sizes, then the values in C
    order. Labels files have magic number 0x00000801 (d = 1), images files 0x00000803 (d = 3).
    Compression is detected from the content, not the file name.

    Args:
        path: The IDX file.

    Returns:
        A writable uint8 array with the shape the header declares.

    Raises:
        FileNotFoundError: The file does not exist.
        ValueError: Corrupt gzip data, a wrong magic number or data type, or a payload that does
            not match the header's dimensions (truncated or over-long file).

    Example:
        >>> labels = read_idx("/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz")
        >>> labels.shape, labels.dtype
        ((10000,), dtype('uint8'))
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"IDX file {path} does not exist.")
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as error:
            raise ValueError(
                f"{path}: the gzip data is corrupt or truncated ({error}); download the file again."
            ) from error
    if len(raw) < 4:
        raise ValueError(
            f"{path}: {len(raw)} bytes is too short for an IDX header (a 4-byte magic number "
            "first); the file is empty or truncated, download it again."
        )
    magic = int.from_bytes(raw[:4], "big")
    dtype_code, ndim = raw[2], raw[3]
    if raw[:2] != b"\x00\x00" or ndim == 0:
        raise ValueError(
            f"{path}: magic number 0x{magic:08X} is not an IDX magic number (0x"
            f"{_IDX_MAGIC_LABELS:08X} for labels, 0x{_IDX_MAGIC_IMAGES:08X} for images). It is "
            "not an IDX file (an HTML error page or another format?); download it again."
        )
    if dtype_code != _IDX_UBYTE:
        type_name = _IDX_TYPE_NAMES.get(dtype_code, "not a valid IDX type")
        raise ValueError(
            f"{path}: IDX data type byte 0x{dtype_code:02X} ({type_name}) is not supported; "
            "MNIST-family files store unsigned bytes (0x08). Convert the file to uint8 IDX."
        )
    header_size = 4 + 4 * ndim
    if len(raw) < header_size:
        raise ValueError(
            f"{path}: the header declares {ndim} dimensions ({header_size} header bytes) but the "
            f"file ends after {len(raw)} bytes; it is truncated, download it again."
        )
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected, actual = math.prod(shape), len(raw) - header_size
    if actual != expected:
        problem = "truncated" if actual < expected else "longer than its header says"
        raise ValueError(
            f"{path}: the header's shape {list(shape)} needs {expected} data bytes but the file "
            f"has {actual}; the file is {problem}. Download it again (an interrupted download or "
            "partial decompression does this)."
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header_size).reshape(shape).copy()


def read_split(
    directory: Path, prefix: str, num_classes: int
) -> tuple[Path, np.ndarray, np.ndarray]:
    """Reads and cross-checks one split's images and labels files: (images path, images, labels)."""
    images_path = _find_idx_file(directory, prefix, "images", "idx3")
    labels_path = _find_idx_file(directory, prefix, "labels", "idx1")
    images = _read_idx_checked(images_path, _IDX_MAGIC_IMAGES, "images [N, rows, cols]")
    labels = _read_idx_checked(labels_path, _IDX_MAGIC_LABELS, "labels [N]")
    if len(images) != len(labels):
        raise ValueError(
            f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} "
            "labels; both files must come from the same dataset and split."
        )
    out_of_range = np.flatnonzero(labels >= num_classes)
    if out_of_range.size:
        i = int(out_of_range[0])
        raise ValueError(
            f"{labels_path}: label {int(labels[i])} (index {i}) is not below num_classes="
            f"{num_classes} ({out_of_range.size} labels out of range). The file is corrupt, or "
            "the dataset has more classes: call load_idx(directory, num_classes=...)."
        )
    return images_path, images, labels


def _find_idx_file(directory: Path, prefix: str, kind: str, tag: str) -> Path:
    """Finds e.g. train-images-idx3-ubyte, its .gz, or the train-images.idx3-ubyte spelling."""
    names = [f"{prefix}-{kind}{sep}{tag}-ubyte{ext}" for sep in ("-", ".") for ext in ("", ".gz")]
    for name in names:
        if (directory / name).is_file():
            return directory / name
    present = sorted(p.name for p in directory.iterdir())
    raise FileNotFoundError(
        f"{directory}: no {prefix} {kind} file; looked for {', '.join(names)}. The directory "
        f"holds {present[:10]}{' ...' if len(present) > 10 else ''}."
    )


def _read_idx_checked(path: Path, magic: int, what: str) -> np.ndarray:
    """`read_idx`, then checks the array has the rank that ``magic`` declares."""
    array = read_idx(path)
    if array.ndim != magic & 0xFF:
        raise ValueError(
            f"{path}: magic number 0x{0x800 | array.ndim:08X} declares a {array.ndim}-D array, "
            f"but {what} need 0x{magic:08X}. Are the images and labels files swapped?"
        )
    return array
