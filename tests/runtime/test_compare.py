"""Output comparison and the tolerance policy (mmexport.runtime.compare, runtime.tolerances), runners verified over input sets."""

import numpy as np
import pytest
import torch

from tests.conftest import FunctionRunner as ArrayRunner
from mmexport.runtime.compare import compare_outputs, random_inputs, verify_runners
from mmexport.runtime.runners.base import BaseRunner
from mmexport.runtime.tolerances import FOLD, FP16, INT8, TOLERANCES
from mmexport.torchside.torch_runner import TorchRunner


def logits_of(batch):
    return batch.reshape(len(batch), -1)[:, :5].astype(np.float32) * 3


def test_policy_table_matches_design():
    assert (FOLD.rtol, FOLD.atol, FOLD.min_top1_agreement) == (1e-5, 1e-5, 1.0)
    assert (TOLERANCES["fp32"].rtol, TOLERANCES["fp32"].atol, TOLERANCES["fp32"].range_rtol) == (1e-4, 1e-4, 1e-5)
    assert (FP16.atol, FP16.range_rtol, FP16.min_cosine, FP16.min_top1_agreement) == (1e-3, 1e-2, 0.999, 0.99)
    assert INT8.rtol is None and INT8.min_top1_agreement == 0.99 and INT8.max_macro_f1_drop == 0.01


def test_identical_outputs_pass_with_zero_error():
    ref = np.random.default_rng(0).normal(size=(50, 5)).astype(np.float32)
    stats = compare_outputs(ref, ref.copy(), FOLD)
    assert stats.passed and stats.max_abs_error == 0 and stats.top1_agreement == 1.0
    assert stats.min_cosine == pytest.approx(1.0) and stats.n_samples == 50


def test_statistics_are_correct():
    ref = np.zeros((4, 3), dtype=np.float32) + np.array([1.0, 2.0, 3.0], dtype=np.float32)
    cand = ref.copy()
    cand[0, 0] += 0.5  # one element off by 0.5, relative 0.5
    stats = compare_outputs(ref, cand, FOLD)
    assert stats.max_abs_error == pytest.approx(0.5)
    assert stats.mean_abs_error == pytest.approx(0.5 / 12)
    assert stats.max_rel_error == pytest.approx(0.5)
    assert stats.elements_out_of_tolerance == 1
    assert not stats.passed and "1 of 12 elements" in stats.failures[0]


def test_tolerance_is_atol_plus_rtol_times_reference():
    ref = np.full((2, 2), 100.0, dtype=np.float32)
    inside = ref + 1e-5 + 1e-5 * 100 * 0.9
    outside = ref + 1e-5 + 1e-5 * 100 * 1.5
    assert compare_outputs(ref, inside, FOLD).passed
    assert not compare_outputs(ref, outside, FOLD).passed


def test_top1_disagreement_fails_even_within_fp16_tolerance():
    ref = np.array([[1.0, 0.999]] * 10, dtype=np.float32)
    cand = ref.copy()
    cand[0] = [0.999, 1.0]  # tiny change that flips the argmax on 10 % of samples
    stats = compare_outputs(ref, cand, FP16)
    assert stats.top1_agreement == pytest.approx(0.9)
    assert any("top-1" in f for f in stats.failures)


def test_nan_and_inf_are_counted_and_fail():
    ref = np.ones((3, 4), dtype=np.float32)
    cand = ref.copy()
    cand[0, 0], cand[1, 1] = np.nan, np.inf
    stats = compare_outputs(ref, cand, FP16)
    assert (stats.nan_count, stats.inf_count) == (1, 1)
    assert not stats.passed


def test_int8_policy_judges_macro_f1_drop_on_labels():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 4, 400)
    ref = np.eye(4, dtype=np.float32)[labels] * 5  # perfect reference
    good = ref + rng.normal(scale=0.3, size=ref.shape).astype(np.float32)  # large error, same argmax
    stats = compare_outputs(ref, good, INT8, labels)
    assert stats.passed and stats.reference_macro_f1 == 1.0
    bad = ref.copy()
    bad[:20] = np.roll(bad[:20], 1, axis=1)  # 5 % wrong
    stats = compare_outputs(ref, bad, INT8, labels)
    assert not stats.passed and any("macro-F1 drop" in f for f in stats.failures)


def test_shape_mismatch_is_a_failure_not_a_crash():
    stats = compare_outputs(np.zeros((2, 3)), np.zeros((2, 4)), FOLD)
    assert not stats.passed and "shape" in stats.failures[0]


def test_random_inputs_are_seeded_and_normalised():
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    a = random_inputs(8, 16, mean, std, seed=3)
    assert np.array_equal(a, random_inputs(8, 16, mean, std, seed=3))
    assert not np.array_equal(a, random_inputs(8, 16, mean, std, seed=4))
    assert a.dtype == np.float32 and a.shape == (8, 3, 16, 16)
    assert a.min() >= -2.0 - 1e-6 and a.max() <= 2.0 + 1e-6  # (u - 0.5) / 0.25 for u in [0, 1)


def test_verify_runners_over_input_sets_with_batching():
    inputs = random_inputs(10, 8, (0.5,) * 3, (0.25,) * 3)
    reference = ArrayRunner("ref", logits_of)
    candidate = ArrayRunner("cand", lambda b: logits_of(b) + 1e-3)
    report = verify_runners(reference, candidate, {"random": (inputs, None)}, FOLD, batch_size=3)
    assert not report.passed
    assert report.input_sets[0].outputs["logits"].n_samples == 10
    good = verify_runners(reference, ArrayRunner("same", logits_of), {"random": (inputs, None)}, FOLD, batch_size=4)
    assert good.passed
    as_dict = good.as_dict()
    assert as_dict["tolerance"]["name"] == "fold" and as_dict["input_sets"][0]["outputs"]["logits"]["passed"]


def test_torch_runner_is_a_runner_and_runs_eval_mode():
    module = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Dropout(0.9), torch.nn.Linear(3 * 4 * 4, 2))
    module.train()
    runner = TorchRunner(module)
    assert isinstance(runner, BaseRunner)
    batch = np.ones((5, 3, 4, 4), dtype=np.float32)
    with runner:
        first, second = runner.infer(batch)["logits"], runner.infer(batch)["logits"]
    assert first.shape == (5, 2) and first.dtype == np.float32
    assert np.array_equal(first, second)  # dropout off: eval mode


def test_fp16_row_is_scale_aware():
    """Logits of magnitude 10-20 carry ~1e-3 of their range in fp16 error: the row accepts that, a fixed bound did not."""
    from mmexport.runtime.tolerances import Tolerance

    rng = np.random.default_rng(5)
    ref = rng.normal(0, 8, size=(200, 5)).astype(np.float32)
    ref[:, 0] = 0.002  # near-zero logits: a relative bound gives them no room
    spread = ref.max(1, keepdims=True) - ref.min(1, keepdims=True)
    cand = ref + (rng.uniform(-1, 1, ref.shape) * 1.5e-3 * spread).astype(np.float32)
    fixed = Tolerance("fp16-fixed", "the 0.1 row", 5e-3, 5e-3, 0.995)
    assert not compare_outputs(ref, cand, fixed).passed
    stats = compare_outputs(ref, cand, FP16)
    assert stats.passed, stats.failures
    worse = ref + (rng.uniform(-1, 1, ref.shape) * 0.03 * spread).astype(np.float32)  # 3 % of the range: a fault
    assert not compare_outputs(ref, worse, FP16).passed


def test_zero_samples_never_pass():
    empty = np.zeros((0, 5), np.float32)
    stats = compare_outputs(empty, empty, FOLD)
    assert not stats.passed and "zero samples" in stats.failures[0]
