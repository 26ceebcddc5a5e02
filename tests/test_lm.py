"""Continual language modelling: the fortunes reader, bits per character, the LM config."""

from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_multidevice import run_on_8_devices

from experiments import config as config_lib
from experiments.configs import fortunes_lm
from experiments.data import load_dataset, text, validate_dataset
from experiments.models.language import CausalTransformer
from experiments.reporting import metrics
from experiments.training import device as device_data
from experiments.training import loop, steps
from experiments.training.methods import MethodSpec

# "riddles" comes with the full English package (fortunes-min has only "fortunes").
MARKERS = {"en": "riddles", "de": "de", "es": "es", "it": "it"}
MISSING = [
    text.PACKAGES[language]
    for language in text.LANGUAGES
    if not (text.FORTUNES_DIR / MARKERS[language]).exists()
]
needs_fortunes = pytest.mark.skipif(
    bool(MISSING),
    reason=f"Debian fortunes packages not installed: {', '.join(MISSING)} "
    f"(apt-get install {' '.join(MISSING)}; files in {text.FORTUNES_DIR})",
)


def write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def test_reader_decodes_splits_and_windows_a_fortunes_tree(tmp_path):
    # English at the top, a Latin-1 German file, and everything the reader must skip.
    write(tmp_path / "a", b"B\x08Bold _\x08x\r\n%\nsecond\nline\n%\n")
    write(tmp_path / "a.dat", b"\x00\x01index")
    (tmp_path / "a.u8").symlink_to("a")
    write(tmp_path / "de" / "b", "Grüße\n%\nÄrger".encode("latin-1"))
    (tmp_path / "c").symlink_to("de/b")  # a top-level link into a language directory
    write(tmp_path / "off" / "rude", b"no\n%\n")
    assert [p.name for p in text.fortune_files("en", tmp_path)] == ["a"]
    assert text.read_records("en", tmp_path) == ["Bold x", "second\nline"]
    assert text.read_records("de", tmp_path) == ["Grüße", "Ärger"]
    with pytest.raises(FileNotFoundError, match="fortunes-es"):
        text.fortune_files("es", tmp_path)
    with pytest.raises(ValueError, match="unknown fortunes language 'fr'"):
        text.fortune_files("fr", tmp_path)

    records = [f"record {k} " + "xyz" * (k % 5) for k in range(200)]
    test = [r for r in records if text.is_test_record(r)]
    # SHA-256 modulo 10 sends about a tenth to test, the same on every call.
    assert 5 <= len(test) <= 40 and test == [r for r in records if text.is_test_record(r)]
    inputs, targets = text.windows(["ab", "é"], 2)
    stream = "ab\n\né".encode()  # 6 bytes: two windows of 3 would need 6 -> exactly 2
    assert inputs.dtype == np.int32 and inputs.shape == (2, 2)
    assert inputs.tolist() == [list(stream[0:2]), list(stream[3:5])]
    assert targets.tolist() == [list(stream[1:3]), list(stream[4:6])]


def test_bits_per_character_counts_code_length_over_characters():
    # Uniform predictions cost 8 bits per byte; "é" is 2 bytes but 1 character.
    targets = np.frombuffer("aé".encode(), np.uint8).astype(np.int32)[None]
    uniform = np.full((1, 3, 256), -np.log(256.0))
    assert text.character_starts(targets).tolist() == [[True, True, False]]
    assert text.bits_per_character(uniform, targets) == pytest.approx(24 / 2)


def tiny_setup(metric="bits_per_character", eval_batch_size=7):
    model = CausalTransformer(num_layers=1, width=8, num_heads=2)
    return steps.StepSetup(
        model, None, batch_size=4, eval_batch_size=eval_batch_size, metric=metric
    )


def test_evaluate_bits_per_character_matches_numpy_reference():
    rng = np.random.default_rng(0)
    # Random bytes with many UTF-8 continuation bytes; 19 rows padded to 23 (padding masked),
    # chunks of 7 (the last overlaps the one before).
    tokens = rng.integers(0, 256, (19, 6)).astype(np.int32)
    targets = rng.integers(0, 256, (19, 6)).astype(np.int32)
    data = device_data.pad_task_data(tokens, targets, np.zeros(19, np.int32), 23)
    setup = tiny_setup()
    params = setup.model.init(jax.random.key(1), jnp.asarray(tokens[:1]))["params"]
    got = float(steps.evaluate(params, data, setup=setup))
    logits = np.asarray(setup.model.apply({"params": params}, jnp.asarray(tokens)), np.float64)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    assert got == pytest.approx(text.bits_per_character(log_probs, targets), rel=1e-5)


def test_lower_is_better_metrics_by_hand():
    # bpc after each task: task 0 learned to 2.0, rises to 2.5 then 3.0; task 1: 1.5 -> 1.75.
    matrix = np.array([[2.0, 6.0, 6.0], [2.5, 1.5, 5.0], [3.0, 1.75, 1.0]])
    summary = metrics.summarize(matrix, "bits_per_character")
    assert summary == pytest.approx(
        {
            "average_bits_per_character": (3.0 + 1.75 + 1.0) / 3,
            "backward_transfer": ((2.0 - 3.0) + (1.5 - 1.75)) / 2,
            "average_forgetting": ((3.0 - 2.0) + (1.75 - 1.5)) / 2,
        }
    )


def test_transformer_config_is_validated():
    config = fortunes_lm.get_config()
    config.transformer.num_heads = 3
    with pytest.raises(config_lib.ConfigError, match="divisible by num_heads"):
        config_lib.validate(config)
    config = fortunes_lm.get_config()
    config.transformer.depth = 2
    with pytest.raises(config_lib.ConfigError, match=r"transformer\.depth"):
        config_lib.validate(config)


def test_first_task_steps_sets_the_first_tasks_length_only():
    # Three tasks of 100, 50 and 70 training examples at batch 10: 10, 5, 7 steps an epoch.
    def task(n):
        return SimpleNamespace(num_valid=n, labels=np.zeros((n, 1), np.int32))

    sets = [task(100), task(50), task(70)]
    data = SimpleNamespace(
        training_sets=lambda name: sets,
        scenario=SimpleNamespace(task_names=("a", "b", "c"), metric="accuracy"),
    )
    config = fortunes_lm.get_config()
    config.batch_size, config.steps_per_task, config.epochs = 10, 0, 2
    config.first_task_steps = 0
    method = MethodSpec("finetune")

    def steps_of():
        spec = config_lib.read_spec(config)
        return loop.make_plan(
            spec.schedule, spec.optimizer, data, method, (0,), label="x"
        ).total_steps

    assert steps_of() == (20, 10, 14)  # epochs x steps an epoch
    config.first_task_steps = 33
    assert steps_of() == (33, 10, 14)
    config.steps_per_task = 4
    assert steps_of() == (33, 4, 4)
    config.first_task_steps = 0
    assert steps_of() == (4, 4, 4)
    config.first_task_steps = -1
    with pytest.raises(config_lib.ConfigError, match="first_task_steps"):
        config_lib.validate(config)


@needs_fortunes
def test_fortunes_datasets_are_disjoint_byte_windows():
    for language in text.LANGUAGES:
        dataset = load_dataset(f"fortunes:{language}:32")
        validate_dataset(dataset)
        assert dataset.train_images.shape[1] == 32 and dataset.num_classes == 256
        assert len(dataset.train_images) > 5 * len(dataset.test_images) > 0
        # Targets are the inputs shifted by one byte.
        np.testing.assert_array_equal(dataset.test_images[:, 1:], dataset.test_labels[:, :-1])
    train_records = [r for r in text.read_records("de") if not text.is_test_record(r)]
    assert not set(train_records) & {r for r in text.read_records("de") if text.is_test_record(r)}


@pytest.mark.slow
@needs_fortunes
def test_small_lm_config_end_to_end_and_on_8_devices_equal_one_device():
    out = run_on_8_devices(
        """
        import tempfile
        from pathlib import Path
        import jax, numpy as np
        from experiments.reporting import metrics
        from experiments.runs import experiment as train
        from experiments.configs import fortunes_lm

        jax.config.update("jax_numpy_dtype_promotion", "strict")
        jax.config.update("jax_numpy_rank_promotion", "raise")
        assert jax.device_count() == 8
        matrices = []
        for parallel in (False, True):
            config = fortunes_lm.get_config("small")
            config.steps_per_task = 20
            config.batch_size = 12  # not a multiple of 8: padded, masked
            config.fisher_samples = 37
            config.test_limit = 61
            config.data_parallel = parallel
            workdir = Path(tempfile.mkdtemp())
            result = train.train_and_evaluate(config, workdir)
            matrices.append(np.asarray([r["accuracy_matrix"] for r in result["runs"]]))
        assert result["metric"] == "bits_per_character" and not result["higher_is_better"]
        assert result["task_names"] == ["en", "de"]
        for run in result["runs"]:
            matrix = np.asarray(run["accuracy_matrix"])
            # Below uniform (8 bits a byte) after 20 steps, and the first language's bits per
            # character moved while the second was trained.
            assert np.all(np.diag(matrix) < 7.5) and matrix[1, 0] != matrix[0, 0], matrix
            expected = metrics.summarize(matrix, "bits_per_character")
            assert np.allclose(list(run["metrics"].values()), list(expected.values()))
            # One epoch call per task (20 steps < an epoch): one curve point each.
            assert [len(c["accuracy"]) for c in run["curves"]] == [1, 2]
        for name in result["figures"]:
            assert (workdir / name).read_bytes()[:4] == b"\\x89PNG", name
        print("max difference", np.abs(matrices[1] - matrices[0]).max())
        np.testing.assert_allclose(matrices[1], matrices[0], rtol=2e-5)
        print("ok", jax.device_count())
        """
    )
    assert "ok 8" in out
