"""The torch side on CUDA (training step, fold, device timing); run with ``MMEXPORT_REQUIRE_GPU=1 python -m pytest -m gpu``."""

import pytest
import torch

from mmexport.torchside.fold import fold
from mmexport.torchside.torch_runner import TorchRunner
from mmexport.runtime.compare import random_inputs
from tests.torchside.test_fold import merged_with_random_logits

pytestmark = pytest.mark.gpu


def test_stage1_training_step_on_cuda():
    merged = merged_with_random_logits("resnet18").cuda().train()
    optimizer = torch.optim.Adam([p for p in merged.parameters() if p.requires_grad], lr=1e-2)
    before = merged.logit("conv1.weight").detach().clone()
    loss = torch.nn.functional.cross_entropy(merged(torch.randn(8, 3, 64, 64, device="cuda")), torch.randint(0, 5, (8,), device="cuda"))
    loss.backward()
    optimizer.step()
    assert merged.logit("conv1.weight").is_cuda
    assert not torch.equal(before, merged.logit("conv1.weight"))


def test_fold_on_cuda_matches_unmerged_and_cpu():
    merged = merged_with_random_logits("resnet50").cuda().eval()
    folded = fold(merged)
    assert next(folded.parameters()).is_cuda
    images = random_inputs(8, 64, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    with TorchRunner(merged, device="cuda") as ref, TorchRunner(folded, device="cuda") as cand:
        reference, candidate = ref.infer(images)["logits"], cand.infer(images)["logits"]
    assert (reference.argmax(1) == candidate.argmax(1)).all()
    assert abs(reference - candidate).max() <= 1e-5 + 1e-5 * abs(reference).max()


def test_device_timing_and_cuda_graphs_match_eager():
    from mmexport.runtime.timing import BenchSettings, ModelUnderTest, benchmark

    merged = merged_with_random_logits("resnet18").eval()
    folded = fold(merged)
    images = random_inputs(4, 64, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    with TorchRunner(folded, device="cuda") as eager, \
            TorchRunner(folded, device="cuda", cuda_graphs=True, device_timing=True) as graphed:
        expected = eager.infer(images)["logits"]
        assert abs(graphed.infer(images)["logits"] - expected).max() < 1e-4
        parts = graphed.last_inference_timings()
    assert set(parts) == {"h2d", "compute", "d2h"} and all(v >= 0 for v in parts.values())
    settings = BenchSettings(batch_sizes=(4,), warmup_s=0.0, duration_s=None, iterations=8, rounds=2, device_timing="compute")
    result = benchmark([ModelUnderTest("f", lambda: TorchRunner(folded, device="cuda", device_timing=True), image_size=64)],
                       settings)[0]
    assert result.latency.iterations == 8 and result.gpu_peak_bytes and result.gpu_peak_bytes > 0
