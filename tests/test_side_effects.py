"""Library calls leave the process as they found it: torch's RNG and threads, the root logger."""

from __future__ import annotations

import logging

import numpy as np
import torch

from mmexport.torchside.operations import stock_network


def test_building_the_stock_model_does_not_reseed_torch():
    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    stock_network("resnet18", 3)
    assert torch.equal(torch.rand(3), expected)
    first, second = stock_network("resnet18", 3), stock_network("resnet18", 3)
    assert torch.equal(first.conv1.weight, second.conv1.weight)  # and it is the same network every time


def test_torch_bench_restores_the_thread_count():
    from mmexport.bench import _torch_threads

    before = torch.get_num_threads()
    with _torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_quantization_leaves_the_root_logger_alone(tmp_path):
    from mmexport.convert.precision import quantize_int8
    from mmexport.torchside.onnx_export import export_onnx
    from mmexport.runtime.modelinfo import ModelInfo

    model = stock_network("resnet18", 3)
    info = ModelInfo("resnet18", ("a", "b", "c"), 32, (0.5,) * 3, (0.25,) * 3)
    export_onnx(model, info, tmp_path / "m.onnx", weights_sha256="0" * 64)
    root = logging.getLogger()
    level, handlers, filters = root.level, list(root.handlers), list(root.filters)
    quantize_int8(tmp_path / "m.onnx", tmp_path / "m.int8.onnx", np.random.default_rng(0).standard_normal(
        (8, 3, 32, 32)).astype(np.float32), max_images=8)
    assert (root.level, root.handlers, root.filters) == (level, handlers, filters)
