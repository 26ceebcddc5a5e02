"""Task streams: permutations, split heads and labels, rotations, subsets, config wiring."""

import numpy as np
import pytest

from experiments import scenarios
from experiments.configs import default
from experiments.data import Dataset


def make_dataset(num_train=60, num_test=20, size=4, num_classes=10, name="synthetic"):
    """Images whose pixels encode (example, pixel) so any reordering is visible."""
    rng = np.random.default_rng(0)

    def images(n):
        return rng.random((n, size, size, 1)).astype(np.float32)

    return Dataset(
        name=name,
        train_images=images(num_train),
        train_labels=(np.arange(num_train) % num_classes).astype(np.int32),
        test_images=images(num_test),
        test_labels=(np.arange(num_test) % num_classes).astype(np.int32),
        num_classes=num_classes,
    )


def test_permutations_are_deterministic_per_seed():
    a = scenarios.pixel_permutations(4, 50, seed=3)
    b = scenarios.pixel_permutations(4, 50, seed=3)
    c = scenarios.pixel_permutations(4, 50, seed=4)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a[1:], c[1:])
    for row in a:
        np.testing.assert_array_equal(np.sort(row), np.arange(50))


def test_first_task_unpermuted_is_an_option():
    identity = scenarios.pixel_permutations(3, 20, seed=0, first_unpermuted=True)
    np.testing.assert_array_equal(identity[0], np.arange(20))
    shuffled = scenarios.pixel_permutations(3, 20, seed=0, first_unpermuted=False)
    assert not np.array_equal(shuffled[0], np.arange(20))
    # The later tasks do not depend on the option.
    np.testing.assert_array_equal(identity[1:], shuffled[1:])


def test_permuted_scenario_applies_one_permutation_per_task_to_train_and_test():
    ds = make_dataset()
    scenario = scenarios.permuted(ds, num_tasks=3, seed=7)
    perms = scenarios.pixel_permutations(3, 16, seed=7)
    assert scenario.num_tasks == 3 and scenario.num_heads == 1 and scenario.num_outputs == 10
    assert scenario.task_names == ["perm0", "perm1", "perm2"]
    for task, perm in zip(scenario.tasks, perms, strict=True):
        for original, permuted in (
            (ds.train_images, task.train_images),
            (ds.test_images, task.test_images),
        ):
            expected = original.reshape(len(original), -1)[:, perm].reshape(original.shape)
            np.testing.assert_array_equal(permuted, expected)
        np.testing.assert_array_equal(task.train_labels, ds.train_labels)
        assert task.head == 0
    np.testing.assert_array_equal(scenario.tasks[0].train_images, ds.train_images)


def test_split_task_incremental_has_one_head_per_pair_and_local_labels():
    ds = make_dataset()
    scenario = scenarios.split(ds, "task")
    assert (scenario.num_heads, scenario.num_outputs) == (5, 2)
    assert scenario.task_names == ["0/1", "2/3", "4/5", "6/7", "8/9"]
    for t, task in enumerate(scenario.tasks):
        assert task.head == t
        keep = np.isin(ds.train_labels, [2 * t, 2 * t + 1])
        np.testing.assert_array_equal(task.train_images, ds.train_images[keep])
        # Class 2t -> 0, class 2t + 1 -> 1.
        np.testing.assert_array_equal(task.train_labels, ds.train_labels[keep] - 2 * t)
        test_keep = np.isin(ds.test_labels, [2 * t, 2 * t + 1])
        np.testing.assert_array_equal(task.test_labels, ds.test_labels[test_keep] - 2 * t)


def test_split_domain_incremental_shares_a_two_way_head():
    scenario = scenarios.split(make_dataset(), "domain")
    assert (scenario.num_heads, scenario.num_outputs) == (1, 2)
    assert {task.head for task in scenario.tasks} == {0}
    for task in scenario.tasks:
        assert set(task.train_labels.tolist()) == {0, 1}


def test_split_class_incremental_keeps_original_labels_on_a_shared_head():
    ds = make_dataset()
    scenario = scenarios.split(ds, "class")
    assert (scenario.num_heads, scenario.num_outputs) == (1, 10)
    for t, task in enumerate(scenario.tasks):
        assert task.head == 0
        assert set(task.train_labels.tolist()) == {2 * t, 2 * t + 1}
        assert set(task.test_labels.tolist()) == {2 * t, 2 * t + 1}


def test_split_with_custom_groups():
    scenario = scenarios.split(make_dataset(), "task", class_groups=[(3, 7), (1, 0)])
    assert scenario.task_names == ["3/7", "1/0"]
    first, second = scenario.tasks
    assert set(first.train_labels.tolist()) == {0, 1}
    # In the second group class 1 comes first, so it is local label 0.
    ds = make_dataset()
    keep = np.isin(ds.train_labels, [1, 0])
    np.testing.assert_array_equal(second.train_labels, 1 - ds.train_labels[keep])


@pytest.mark.parametrize(
    ("mode", "groups", "match"),
    [
        ("sideways", None, "unknown split mode"),
        ("task", [(0, 1), (1, 2)], "disjoint"),
        ("domain", [(0, 1), (2, 3, 4)], "one size"),
        ("class", [(0, 10)], r"classes must lie in \[0, 10\)"),
    ],
)
def test_split_rejects_bad_groups(mode, groups, match):
    with pytest.raises(ValueError, match=match):
        scenarios.split(make_dataset(), mode, class_groups=groups)


def test_rotation_by_zero_is_identity_and_by_90_is_rot90():
    ds = make_dataset(size=8)
    np.testing.assert_array_equal(scenarios.rotate_images(ds.test_images, 0), ds.test_images)
    np.testing.assert_allclose(
        scenarios.rotate_images(ds.test_images, 90),
        np.rot90(ds.test_images, k=1, axes=(1, 2)),
        atol=1e-6,
    )


def test_rotated_scenario_names_and_shapes():
    ds = make_dataset(size=8)
    scenario = scenarios.rotated(ds, [0, 45, 90])
    assert scenario.task_names == ["rot0", "rot45", "rot90"]
    for task in scenario.tasks:
        assert task.train_images.shape == ds.train_images.shape
        assert task.train_images.dtype == np.float32
        assert task.train_images.min() >= 0.0 and task.train_images.max() <= 1.0
    assert not np.allclose(scenario.tasks[1].train_images, ds.train_images)


def test_task_sequence_needs_one_image_shape():
    mnist_like = make_dataset(name="embedded:mnist")
    fashion_like = make_dataset(name="idx:/data/fashion-mnist")
    scenario = scenarios.task_sequence([mnist_like, fashion_like])
    assert scenario.task_names == ["mnist", "fashion-mnist"]
    assert (scenario.num_heads, scenario.num_outputs) == (1, 10)
    with pytest.raises(ValueError, match="one image shape"):
        scenarios.task_sequence([mnist_like, make_dataset(size=5)])


def test_subsample_is_seeded_and_keeps_order():
    ds = make_dataset()
    a = scenarios.subsample(ds, 10, 5, seed=1)
    b = scenarios.subsample(ds, 10, 5, seed=1)
    assert len(a.train_labels) == 10 and len(a.test_labels) == 5
    np.testing.assert_array_equal(a.train_images, b.train_images)
    assert scenarios.subsample(ds, 0, 0, seed=1) is ds
    # Kept examples are rows of the original, in their original order.
    rows = [
        int(np.flatnonzero((ds.train_images == x).all(axis=(1, 2, 3)))[0]) for x in a.train_images
    ]
    assert rows == sorted(rows)


def test_build_scenario_from_config_and_loaded_data():
    config = default.get_config()
    config.scenario = "split"
    config.split_mode = "domain"
    config.datasets = ("embedded:digits",)
    config.train_limit = 200
    from experiments.data import load_dataset

    datasets = {"embedded:digits": load_dataset("embedded:digits")}
    scenario = scenarios.build_scenario(config, datasets, seed=0)
    assert scenario.name == "split-domain"
    assert scenario.num_tasks == 5
    assert sum(len(t.train_labels) for t in scenario.tasks) == 200
    assert scenario.tasks[0].train_images.shape[1:] == (8, 8, 1)
