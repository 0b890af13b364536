"""Property-based tests (hypothesis): blend/fold equivalence, mixing weights, manifests and preprocessing blocks."""

from __future__ import annotations

import string

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mmexport.torchside.fold import fold
from mmexport.torchside.merge import GRANULARITIES, MergedModel, coefficient_shape, mixing_weights
from mmexport.runtime.compare import compare_outputs
from mmexport.runtime.preprocess import Preprocessing
from mmexport.runtime.tolerances import FOLD
from tests.conftest import backbone_state

shapes = st.lists(st.integers(1, 6), min_size=0, max_size=4).map(tuple)


@given(shape=shapes, granularity=st.sampled_from(GRANULARITIES))
def test_coefficients_broadcast_to_their_parameter(shape, granularity):
    coefficient = coefficient_shape(shape, granularity)
    assert np.broadcast_shapes(coefficient, shape) == shape
    if granularity == "layer":
        assert coefficient == ()
    if granularity == "kernel" and len(shape) == 4:
        assert coefficient == shape[:2] + (1, 1)


@given(sources=st.integers(2, 5), shape=shapes, seed=st.integers(0, 2**31 - 1), scale=st.floats(0.0, 30.0))
def test_mixing_weights_are_a_convex_combination(sources, shape, seed, scale):
    generator = torch.Generator().manual_seed(seed)
    lead = () if sources == 2 else (sources,)
    logit = torch.randn(lead + shape, generator=generator) * scale
    weights = mixing_weights(logit, sources)
    assert weights.shape == (sources,) + shape
    assert torch.all(weights >= 0) and torch.all(weights <= 1)
    torch.testing.assert_close(weights.sum(0), torch.ones(shape), rtol=0, atol=1e-6)


_STATES = {seed: backbone_state("resnet18", seed, num_classes=3) for seed in range(1, 5)}


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sources=st.integers(2, 4), granularity=st.sampled_from(GRANULARITIES), seed=st.integers(0, 10_000),
       scale=st.sampled_from([0.1, 1.0, 5.0]))
def test_fold_computes_the_merge_for_any_logits(sources, granularity, seed, scale):
    """For random logits, any granularity and 2-4 sources, the stock network of the fold is the merged network."""
    merged = MergedModel("resnet18", [_STATES[i + 1] for i in range(sources)], 3, granularity=granularity)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in merged.logits.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)
    merged.eval()
    folded = fold(merged)
    images = torch.randn(4, 3, 32, 32, generator=generator)
    with torch.no_grad():
        expected, actual = merged(images).numpy(), folded(images).numpy()
    stats = compare_outputs(expected, actual, FOLD)
    assert stats.passed, stats.failures


names = st.text(alphabet=string.ascii_lowercase + string.digits + "_-", min_size=1, max_size=12)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(files=st.dictionaries(names.map(lambda n: f"{n}.bin"), st.binary(max_size=64), min_size=1, max_size=6),
       details=st.dictionaries(names, st.one_of(st.integers(-10**6, 10**6), st.booleans(), names), max_size=3))
def test_manifest_round_trips(tmp_path_factory, files, details):
    from mmexport.fileio import sha256_file
    from mmexport.runs.manifest import RunDir

    reserved = {"kind", "sha256", "size_bytes", "created"}
    details = {k: v for k, v in details.items() if k not in reserved}
    root = tmp_path_factory.mktemp("manifest")
    run = RunDir.create(root / "run", command="property test")
    for name, content in files.items():
        run.write_output(name, lambda path, data=content: path.write_bytes(data), "blob", **details)
    published = run.publish()
    reopened = RunDir.open(published)
    assert set(reopened.manifest["outputs"]) == set(files)
    for name, content in files.items():
        entry = reopened.manifest["outputs"][name]
        assert entry["size_bytes"] == len(content) and entry["sha256"] == sha256_file(published / name)
        assert {k: entry[k] for k in details} == details
        assert reopened.checked_file(name).read_bytes() == content


@given(size=st.integers(16, 512), fraction=st.floats(0.5, 1.0), exact=st.booleans(),
       mean=st.tuples(*[st.floats(0, 1)] * 3), std=st.tuples(*[st.floats(0.01, 1)] * 3))
def test_preprocessing_blocks_round_trip(size, fraction, exact, mean, std):
    block = Preprocessing.exact(size, mean, std) if exact else Preprocessing.center_crop(size, mean, std, fraction)
    again = Preprocessing.from_json(block.to_json())
    assert again == block and again.output_size == (size, size)
