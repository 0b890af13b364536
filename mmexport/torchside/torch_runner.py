"""The PyTorch backend (torch side): an ``nn.Module`` behind the runtime's runner contract."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from mmexport.errors import MMExportError
from mmexport.runtime.runners.base import BaseRunner, TensorMetadata

INPUT_NAME = "image"
OUTPUT_NAME = "logits"


class TorchRunner(BaseRunner):
    """Runs an ``nn.Module`` in eval mode under ``inference_mode`` on a chosen device.

    Input ``image`` (float32 N x 3 x H x W), output ``logits``. On CUDA,
    ``cuda_graphs=True`` captures one CUDA graph per input shape on first use and
    replays it (static input/output buffers), removing per-kernel launch overhead;
    ``device_timing=True`` times the host→device copy, compute and device→host copy
    with CUDA events and reports them through ``last_inference_timings()``.
    """

    def __init__(self, module: nn.Module, name: str = "torch", device: str | torch.device = "cpu", *,
                 cuda_graphs: bool = False, device_timing: bool = False, image_size: int | None = None) -> None:
        super().__init__(name)
        self.device = torch.device(device)
        self.module = module
        if (cuda_graphs or device_timing) and self.device.type != "cuda":
            raise MMExportError("CUDA graphs and device-side timing need a CUDA device (--device cuda)")
        self.cuda_graphs = cuda_graphs
        self.device_timing = device_timing
        self.image_size = image_size
        self._graphs: dict[tuple[int, ...], tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}

    def activate_impl(self) -> None:
        self.module = self.module.to(self.device).eval()

    def deactivate_impl(self) -> None:
        self._graphs.clear()

    def input_metadata_impl(self) -> dict[str, TensorMetadata]:
        size = self.image_size
        return {INPUT_NAME: TensorMetadata(np.dtype(np.float32), (None, 3, size, size))}

    def _to_device(self, batch: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
        if self.device.type == "cuda":
            tensor = tensor.pin_memory()
        return tensor.to(self.device, non_blocking=True)

    def _compute(self, inputs: torch.Tensor) -> torch.Tensor:
        if not self.cuda_graphs:
            return self.module(inputs)
        key = tuple(inputs.shape)
        if key not in self._graphs:
            static_in = inputs.clone()
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(3):  # warm-up on a side stream, as torch.cuda.graphs requires
                    self.module(static_in)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = self.module(static_in)
            self._graphs[key] = (graph, static_in, static_out)
        graph, static_in, static_out = self._graphs[key]
        static_in.copy_(inputs)
        graph.replay()
        return static_out

    def infer_impl(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        batch = feed[INPUT_NAME]
        if not self.device_timing:
            with torch.inference_mode():
                return {OUTPUT_NAME: self._compute(self._to_device(batch)).float().cpu().numpy()}
        events = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
        with torch.inference_mode():
            events[0].record()
            inputs = self._to_device(batch)
            events[1].record()
            outputs = self._compute(inputs)
            events[2].record()
            host = outputs.float().to("cpu", non_blocking=False)
            events[3].record()
        events[3].synchronize()
        self._last_timings = {
            "h2d": events[0].elapsed_time(events[1]),
            "compute": events[1].elapsed_time(events[2]),
            "d2h": events[2].elapsed_time(events[3]),
        }
        return {OUTPUT_NAME: host.numpy()}
