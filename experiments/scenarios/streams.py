"""Task streams for continual learning: sequences, permuted, split and rotated datasets.

A :class:`Scenario` is an ordered tuple of :class:`Task` s plus the output layout the model needs
(how many heads, how many outputs each). Every task of a scenario has images of one shape, so a
jitted train step compiled for the first task serves them all.

The three split-dataset settings follow van de Ven, Tuytelaars & Tolias 2022 ("Three types of
incremental learning"):

* ``task``-incremental: one 2-way head per task, labels ``{0, 1}`` within the task's class pair,
  and the task identity picks the head at train and test time.
* ``domain``-incremental: one shared 2-way head, labels ``{0, 1}`` ("first or second class of the
  pair"), no task identity.
* ``class``-incremental: one shared head over all classes, original labels.

Example:
    >>> import numpy as np
    >>> perms = pixel_permutations(3, 4, seed=0)
    >>> perms.shape, perms[0].tolist()
    ((3, 4), [0, 1, 2, 3])
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Literal

import numpy as np

from experiments.data.dataset import Dataset
from experiments.spec import SPLIT_MODES

LabeledImages = Dataset
"""What the scenario builders read: ``experiments.data.Dataset``."""


@dataclasses.dataclass(frozen=True)
class Task:
    """One task of a stream.

    For text (:mod:`experiments.data.text`) the "images" are int32 input bytes ``[N, T]`` and the
    "labels" int32 next-byte targets ``[N, T]``.

    Attributes:
        name: short label for tables and plots, e.g. ``"perm1"``, ``"2/3"`` or ``"de"``.
        train_images: float32 ``[N, H, W, C]`` in [0, 1] (text: int32 ``[N, T]``).
        train_labels: int32 ``[N]``, in the output space of the task's head (text: ``[N, T]``).
        test_images: float32 ``[M, H, W, C]``.
        test_labels: int32 ``[M]``.
        head: index of the output head this task uses (0 unless task-incremental).
    """

    name: str
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    head: int = 0


@dataclasses.dataclass(frozen=True)
class Scenario:
    """An ordered task stream and the output layout it needs.

    Attributes:
        name: e.g. ``"permuted"`` or ``"split-task"``.
        tasks: the tasks, in training order.
        num_heads: number of output heads (one per task for task-incremental, else 1).
        num_outputs: outputs of each head.
        metric: what the evaluation measures, a key of
        :data:`experiments.reporting.metrics.METRICS`:
            ``"accuracy"`` for images, ``"bits_per_character"`` for text.
    """

    name: str
    tasks: tuple[Task, ...]
    num_heads: int
    num_outputs: int
    metric: str = "accuracy"

    @property
    def num_tasks(self) -> int:
        """Number of tasks in the stream."""
        return len(self.tasks)

    @property
    def task_names(self) -> list[str]:
        """The tasks' names, in order."""
        return [task.name for task in self.tasks]


def _task(
    name: str,
    train_images: np.ndarray,
    train_labels: np.ndarray,
    test_images: np.ndarray,
    test_labels: np.ndarray,
    head: int = 0,
) -> Task:
    # Text keeps its integer bytes; images become float32.
    dtype = np.int32 if np.issubdtype(np.asarray(train_images).dtype, np.integer) else np.float32
    return Task(
        name=name,
        train_images=np.ascontiguousarray(train_images, dtype=dtype),
        train_labels=np.asarray(train_labels, dtype=np.int32),
        test_images=np.ascontiguousarray(test_images, dtype=dtype),
        test_labels=np.asarray(test_labels, dtype=np.int32),
        head=head,
    )


def short_name(spec: str) -> str:
    """A short name: ``"idx:/usr/share/datasets/fashion-mnist"`` -> ``"fashion-mnist"``."""
    return spec.rstrip("/").rpartition(":")[2].rpartition("/")[2] or spec


def task_sequence(datasets: Sequence[LabeledImages]) -> Scenario:
    """A stream of whole datasets, one task each, sharing one head (e.g. MNIST -> Fashion-MNIST).

    Text datasets (``"fortunes:en"``, ``"fortunes:de"``, ...) make a language sequence measured
    in bits per character; a stream cannot mix text and images.

    Args:
        datasets: datasets whose images (or byte sequences) all have one shape.

    Returns:
        A single-head scenario with as many outputs as the largest ``num_classes``.

    Raises:
        ValueError: if no dataset is given or their image shapes differ.
    """
    if not datasets:
        raise ValueError("a task sequence needs at least one dataset")
    shapes = {tuple(ds.train_images.shape[1:]) for ds in datasets}
    if len(shapes) != 1:
        raise ValueError(
            f"all datasets of a sequence need one image shape, got {sorted(shapes)}; resize them "
            "to one [H, W, C] or choose datasets of one shape"
        )
    tasks = tuple(
        _task(short_name(ds.name), ds.train_images, ds.train_labels, ds.test_images, ds.test_labels)
        for ds in datasets
    )
    kinds = {np.issubdtype(ds.train_images.dtype, np.integer) for ds in datasets}
    if len(kinds) != 1:
        raise ValueError("a sequence cannot mix text datasets and image datasets")
    return Scenario(
        name="sequence",
        tasks=tasks,
        num_heads=1,
        num_outputs=max(ds.num_classes for ds in datasets),
        metric="bits_per_character" if kinds.pop() else "accuracy",
    )


def pixel_permutations(
    num_tasks: int, num_pixels: int, seed: int, *, first_unpermuted: bool = True
) -> np.ndarray:
    """Fixed pixel permutations, one per task, drawn from ``seed``.

    Args:
        num_tasks: how many permutations.
        num_pixels: length of each (``H * W * C``).
        seed: NumPy seed; the same seed gives the same permutations.
        first_unpermuted: make the first one the identity (task 1 is the plain dataset).

    Returns:
        int64 ``[num_tasks, num_pixels]``; row ``t`` is task ``t``'s permutation.
    """
    rng = np.random.default_rng(seed)
    perms = np.stack([rng.permutation(num_pixels) for _ in range(num_tasks)])
    if first_unpermuted and num_tasks:
        perms[0] = np.arange(num_pixels)
    return perms


def _permute(images: np.ndarray, permutation: np.ndarray) -> np.ndarray:
    flat = images.reshape(images.shape[0], -1)
    return flat[:, permutation].reshape(images.shape)


def permuted(
    dataset: LabeledImages, num_tasks: int, seed: int, *, first_unpermuted: bool = True
) -> Scenario:
    """Permuted dataset (Kirkpatrick et al. 2017): each task shuffles the pixels in a fixed way.

    Labels are unchanged and all tasks share one head (the domain-incremental setting).

    Args:
        dataset: the base dataset.
        num_tasks: number of permutations (tasks).
        seed: seed of the permutations.
        first_unpermuted: task 1 is the unpermuted dataset.

    Returns:
        The scenario; task ``t`` is named ``perm{t}``.
    """
    if num_tasks < 1:
        raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
    num_pixels = int(np.prod(dataset.train_images.shape[1:]))
    perms = pixel_permutations(num_tasks, num_pixels, seed, first_unpermuted=first_unpermuted)
    tasks = tuple(
        _task(
            f"perm{t}",
            _permute(dataset.train_images, perms[t]),
            dataset.train_labels,
            _permute(dataset.test_images, perms[t]),
            dataset.test_labels,
        )
        for t in range(num_tasks)
    )
    return Scenario("permuted", tasks, num_heads=1, num_outputs=dataset.num_classes)


def class_permutation(num_classes: int, seed: int) -> np.ndarray:
    """A class order drawn from ``seed``: the original class at each position.

    van de Ven's continual-learning code relabels class ``y`` as ``p[y]`` for a random
    permutation ``p`` before splitting the new labels into consecutive groups, so every seed
    sees other class pairs; position ``k`` of that order holds the class ``argsort(p)[k]``.
    (That code keeps the identity for its seed 0; here every seed is permuted.)

    Args:
        num_classes: how many classes.
        seed: NumPy seed; the same seed gives the same order.

    Returns:
        int64 ``[num_classes]``, every class exactly once.

    Example:
        >>> sorted(class_permutation(10, seed=1).tolist()) == list(range(10))
        True
    """
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1,))).permutation(
        num_classes
    )


def class_pairs(num_classes: int) -> list[tuple[int, ...]]:
    """Consecutive class pairs ``(0, 1), (2, 3), ...`` (an odd last class is dropped)."""
    return [(c, c + 1) for c in range(0, num_classes - 1, 2)]


def split(
    dataset: LabeledImages,
    mode: Literal["task", "domain", "class"],
    class_groups: Sequence[Sequence[int]] | None = None,
    class_order: Sequence[int] | None = None,
) -> Scenario:
    """Split dataset: each task holds a disjoint group of classes (default: consecutive pairs).

    Args:
        dataset: the base dataset.
        mode: ``"task"`` (one head per task, labels = position within the group), ``"domain"``
            (one shared head, labels = position within the group) or ``"class"`` (one shared head
            over all classes, original labels).
        class_groups: the classes of each task; groups must be disjoint and, for the task and
            domain modes, of one size.
        class_order: the class at each position (e.g. :func:`class_permutation`), or None for
            label order. Given one, the dataset is first relabelled ``y -> position of y``, as
            van de Ven's code does, and ``class_groups`` (and the labels of the class mode)
            refer to positions; the task names show the original classes.

    Returns:
        The scenario; a task is named after its classes, e.g. ``"2/3"``.

    Raises:
        ValueError: unknown mode, overlapping or uneven groups, or classes outside the dataset.
    """
    if mode not in SPLIT_MODES:
        raise ValueError(f"unknown split mode {mode!r}; valid modes: {SPLIT_MODES}")
    order = np.arange(dataset.num_classes) if class_order is None else np.asarray(class_order)
    if sorted(order.tolist()) != list(range(dataset.num_classes)):
        raise ValueError(f"class_order must hold every class once, got {order.tolist()}")
    if class_order is not None:
        position = np.argsort(order).astype(np.int32)
        dataset = dataset._replace(
            train_labels=position[dataset.train_labels], test_labels=position[dataset.test_labels]
        )
    groups = [tuple(int(c) for c in g) for g in (class_groups or class_pairs(dataset.num_classes))]
    flat = [c for g in groups for c in g]
    if not groups or any(not g for g in groups):
        raise ValueError(f"class groups must be non-empty, got {groups}")
    if len(set(flat)) != len(flat):
        raise ValueError(f"class groups must be disjoint, got {groups}")
    if min(flat) < 0 or max(flat) >= dataset.num_classes:
        raise ValueError(f"classes must lie in [0, {dataset.num_classes}), got {groups}")
    group_size = len(groups[0])
    if mode != "class" and any(len(g) != group_size for g in groups):
        raise ValueError(f"{mode}-incremental needs groups of one size, got {groups}")

    tasks = []
    for t, group in enumerate(groups):
        # Position of each original label within its group; -1 for classes outside it.
        to_local = np.full(dataset.num_classes, -1, dtype=np.int32)
        to_local[list(group)] = np.arange(len(group), dtype=np.int32)
        train_keep = np.isin(dataset.train_labels, group)
        test_keep = np.isin(dataset.test_labels, group)
        train_labels = dataset.train_labels[train_keep]
        test_labels = dataset.test_labels[test_keep]
        if mode != "class":
            train_labels = to_local[train_labels]
            test_labels = to_local[test_labels]
        tasks.append(
            _task(
                "/".join(str(order[c]) for c in group),
                dataset.train_images[train_keep],
                train_labels,
                dataset.test_images[test_keep],
                test_labels,
                head=t if mode == "task" else 0,
            )
        )
    return Scenario(
        name=f"split-{mode}",
        tasks=tuple(tasks),
        num_heads=len(groups) if mode == "task" else 1,
        num_outputs=dataset.num_classes if mode == "class" else group_size,
    )


def rotate_images(images: np.ndarray, angle: float) -> np.ndarray:
    """Rotates ``[N, H, W, C]`` images by ``angle`` degrees about their centre (bilinear).

    Args:
        images: float images in [0, 1].
        angle: degrees, counter-clockwise.

    Returns:
        float32 images of the same shape, clipped to [0, 1].
    """
    from scipy import ndimage

    if angle % 360 == 0:
        return np.asarray(images, dtype=np.float32)
    rotated = ndimage.rotate(images, angle, axes=(1, 2), reshape=False, order=1, cval=0.0)
    return np.clip(rotated, 0.0, 1.0).astype(np.float32)


def rotated(dataset: LabeledImages, angles: Sequence[float]) -> Scenario:
    """Rotated dataset: task ``t`` shows every image rotated by ``angles[t]`` degrees.

    Args:
        dataset: the base dataset.
        angles: one angle (degrees) per task.

    Returns:
        A single-head scenario; task ``t`` is named ``rot{angle}``.
    """
    if not angles:
        raise ValueError("a rotated scenario needs at least one angle")
    tasks = tuple(
        _task(
            f"rot{angle:g}",
            rotate_images(dataset.train_images, angle),
            dataset.train_labels,
            rotate_images(dataset.test_images, angle),
            dataset.test_labels,
        )
        for angle in angles
    )
    return Scenario("rotated", tasks, num_heads=1, num_outputs=dataset.num_classes)
