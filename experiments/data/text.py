"""Real text for continual language modelling: Debian's ``fortunes`` files as byte sequences.

``load_fortunes(language)`` reads every fortune file of one language (the spec
``"fortunes:<language>"`` of :func:`experiments.data.load_dataset`), and cuts the text into
fixed-length byte windows for a byte-level causal language model (vocabulary 256):

* ``en``: the regular files at the top of ``/usr/share/games/fortunes`` (package ``fortunes``;
  the top level also holds links into ``it/``, which are skipped: only files whose real path lies
  in the top directory count); ``de``, ``es``, ``it``: the files of that subdirectory (packages
  ``fortunes-de``, ``fortunes-es``, ``fortunes-it``). Index files (``*.dat``), the ``*.u8`` links
  and the offensive ``off/`` directories are skipped.
* Decoding: each file is decoded as UTF-8; a file that is not valid UTF-8 is decoded as
  Latin-1 (every byte is a character, nothing is lost). Overstruck characters (``c\\bc``,
  ``_\\bc``, the typewriter bold and underline of old fortunes) keep their last character;
  other control characters but newline and tab are dropped; CRLF becomes LF. The text is then
  re-encoded as UTF-8, so a model sees UTF-8 bytes whatever the file's encoding.
* Records: a file's fortunes are separated by lines holding only ``%``. Records are split into
  train and test by a hash of their text (SHA-256, 1 in ``test_every`` to test), so the split
  is the same on every machine and for every seed, and a record is never in both.
* Sequences: each split's records, in file order (files sorted by name), are joined with a
  blank line and cut into non-overlapping windows of ``context_length + 1`` bytes; a window's
  first ``context_length`` bytes are the input and its last ``context_length`` the targets
  (next-byte prediction). The spec ``"fortunes:<language>:<context_length>"`` sets the length
  (default 64).

The result is an :class:`experiments.data.Dataset` whose "images" are int32 input bytes
``[N, T]`` and whose "labels" are int32 target bytes ``[N, T]`` with ``num_classes=256``; the
rest of the pipeline (subsets, padding, data-parallel batches) treats it like any dataset, and
the scenario measures it in bits per character (:func:`bits_per_character`).

Example:
    >>> records_of("a\\n%\\nb\\nc\\n%\\n")
    ['a', 'b\\nc']
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import numpy as np

from experiments.data.dataset import Dataset

FORTUNES_DIR = Path("/usr/share/games/fortunes")
"""Where Debian's fortunes packages install their files."""

LANGUAGES = {"en": "", "de": "de", "es": "es", "it": "it"}
"""Language code -> subdirectory of :data:`FORTUNES_DIR` (English: the top level)."""

PACKAGES = {"en": "fortunes", "de": "fortunes-de", "es": "fortunes-es", "it": "fortunes-it"}
"""The Debian package that installs each language."""

VOCAB_SIZE = 256
"""Byte-level vocabulary."""

DEFAULT_CONTEXT_LENGTH = 64

_OVERSTRIKE = re.compile(r".\x08")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def decode(raw: bytes) -> str:
    """UTF-8 if the bytes are valid UTF-8, else Latin-1; overstrikes and control chars removed.

    Example:
        >>> decode(b"_\\x08b_\\x08e bold\\r\\n"), decode("café".encode("latin-1"))
        ('be bold\\n', 'café')
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    text = text.replace("\r\n", "\n")
    text = _OVERSTRIKE.sub("", text)
    return _CONTROL.sub("", text)


def records_of(text: str) -> list[str]:
    """The fortunes of a file's text: blocks between lines holding only ``%``, stripped."""
    records = re.split(r"^%[ \t]*$", text, flags=re.MULTILINE)
    return [r.strip("\n") for r in records if r.strip()]


def fortune_files(language: str, root: str | os.PathLike[str] | None = None) -> list[Path]:
    """The fortune files of ``language``, sorted by name (rules in the module docstring).

    Raises:
        ValueError: an unknown language.
        FileNotFoundError: the language's directory or files are missing.
    """
    if language not in LANGUAGES:
        raise ValueError(
            f"unknown fortunes language {language!r}; valid: {', '.join(LANGUAGES)} "
            '(spec "fortunes:<language>[:<context_length>]")'
        )
    base = Path(root or FORTUNES_DIR)
    directory = base / LANGUAGES[language]
    missing = (
        f"install Debian's {PACKAGES[language]} package "
        f"(apt-get install {PACKAGES[language]}), which puts its files in {directory}"
    )
    if not directory.is_dir():
        raise FileNotFoundError(f"no fortunes directory {directory}: {missing}")
    files = [
        path
        for path in sorted(directory.iterdir())
        if path.is_file()
        and not path.is_symlink()
        and path.suffix not in (".dat", ".u8")
        and path.resolve().parent == directory.resolve()
    ]
    if not files:
        raise FileNotFoundError(f"no fortune files in {directory}: {missing}")
    return files


def read_records(language: str, root: str | os.PathLike[str] | None = None) -> list[str]:
    """Every fortune of ``language``, files in name order, records in file order."""
    return [
        r for path in fortune_files(language, root) for r in records_of(decode(path.read_bytes()))
    ]


def is_test_record(record: str, test_every: int = 10) -> bool:
    """Whether a record belongs to the test split: its SHA-256 modulo ``test_every`` is 0."""
    digest = hashlib.sha256(record.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") % test_every == 0


def windows(records: list[str], context_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Records joined by blank lines, cut into ``[N, T]`` inputs and next-byte targets.

    Example:
        >>> inputs, targets = windows(["abc", "de"], 3)
        >>> bytes(inputs[0].astype(np.uint8)), bytes(targets[0].astype(np.uint8))
        (b'abc', b'bc\\n')
    """
    stream = np.frombuffer("\n\n".join(records).encode("utf-8"), np.uint8)
    span = context_length + 1
    count = len(stream) // span
    blocks = stream[: count * span].reshape(count, span).astype(np.int32)
    return np.ascontiguousarray(blocks[:, :-1]), np.ascontiguousarray(blocks[:, 1:])


def load_fortunes(spec_arg: str, root: str | os.PathLike[str] | None = None):
    """The dataset of ``"fortunes:<language>[:<context_length>]"`` (``spec_arg`` after the colon).

    Args:
        spec_arg: e.g. ``"en"`` or ``"de:128"``.
        root: the fortunes directory (default :data:`FORTUNES_DIR`).

    Returns:
        An :class:`experiments.data.Dataset` of byte windows (module docstring), named
        ``"fortunes:<language>"``.
    """
    language, _, length = spec_arg.partition(":")
    try:
        context_length = int(length) if length else DEFAULT_CONTEXT_LENGTH
    except ValueError:
        context_length = 0
    if context_length < 1:
        raise ValueError(
            f'fortunes spec "fortunes:{spec_arg}": the context length must be a positive integer'
        )
    records = read_records(language, root)
    test = [r for r in records if is_test_record(r)]
    train = [r for r in records if not is_test_record(r)]
    train_inputs, train_targets = windows(train, context_length)
    test_inputs, test_targets = windows(test, context_length)
    return Dataset(
        name=f"fortunes:{language}",
        train_images=train_inputs,
        train_labels=train_targets,
        test_images=test_inputs,
        test_labels=test_targets,
        num_classes=VOCAB_SIZE,
    )


def is_text(dataset) -> bool:
    """Whether a dataset holds byte sequences (int inputs ``[N, T]``) rather than images."""
    return np.issubdtype(dataset.train_images.dtype, np.integer)


def validate_text(dataset) -> None:
    """Checks a byte-sequence dataset: int32 ``[N, T]`` inputs and targets of one shape, bytes.

    Raises:
        ValueError: naming the dataset, the split and what is wrong.
    """
    name = dataset.name
    for split in ("train", "test"):
        inputs = getattr(dataset, f"{split}_images")
        targets = getattr(dataset, f"{split}_labels")
        if inputs.dtype != np.int32 or inputs.ndim != 2 or targets.shape != inputs.shape:
            raise ValueError(
                f"{name}: {split} sequences must be int32 inputs [N, T] with targets of the same "
                f"shape; got {inputs.dtype} {list(inputs.shape)} and {targets.dtype} "
                f"{list(targets.shape)}."
            )
        if len(inputs) == 0:
            raise ValueError(f"{name}: the {split} split has no sequences (too little text?).")
        for what, array in (("inputs", inputs), ("targets", targets)):
            if array.min() < 0 or array.max() >= dataset.num_classes:
                raise ValueError(f"{name}: {split} {what} outside [0, {dataset.num_classes}).")
    if dataset.train_images.shape[1] != dataset.test_images.shape[1]:
        raise ValueError(f"{name}: train and test sequences differ in length.")


def character_starts(targets: np.ndarray) -> np.ndarray:
    """Which target bytes begin a UTF-8 character (not a ``10xxxxxx`` continuation byte)."""
    return (np.asarray(targets) & 0xC0) != 0x80


def bits_per_character(log_probs: np.ndarray, targets: np.ndarray) -> float:
    r"""Bits per character of predicted bytes: total code length over characters predicted.

    .. math:: \mathrm{bpc} = \frac{-\sum_{n,t} \log_2 p(y_{nt} \mid y_{n,<t})}
        {\#\{(n, t): y_{nt} \text{ starts a UTF-8 character}\}}

    The numerator is the cost of coding every target byte; the denominator counts the
    characters among them, so a two-byte ``é`` costs its two bytes' bits but counts once. For
    ASCII text it equals bits per byte. A NumPy reference for the jitted evaluation.

    Args:
        log_probs: natural-log probabilities ``[N, T, 256]``.
        targets: the target bytes ``[N, T]``.
    """
    picked = np.take_along_axis(log_probs, np.asarray(targets)[..., None], axis=-1)[..., 0]
    return float(-picked.sum() / np.log(2.0) / character_starts(targets).sum())
