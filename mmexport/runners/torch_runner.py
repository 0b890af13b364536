from __future__ import annotations

import numpy as np
import torch
from torch import nn

from mmexport.errors import MMExportError


class TorchRunner:
    """Runs an ``nn.Module`` in eval mode under ``inference_mode`` on a chosen device.

    On CUDA, ``cuda_graphs=True`` captures one CUDA graph per input shape on first use
    and replays it (static input/output buffers), removing per-kernel launch overhead.
    ``timed_infer`` reports host→device copy, compute and device→host copy separately,
    each timed with CUDA events on the device (``mmexport bench --device-timing``).
    """

    def __init__(self, module: nn.Module, name: str = "torch", device: str | torch.device = "cpu", *,
                 cuda_graphs: bool = False) -> None:
        self.name = name
        self.device = torch.device(device)
        self.module = module
        if cuda_graphs and self.device.type != "cuda":
            raise MMExportError("CUDA graphs need a CUDA device (--device cuda)")
        self.cuda_graphs = cuda_graphs
        self._graphs: dict[tuple[int, ...], tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}

    def __enter__(self) -> "TorchRunner":
        self.module = self.module.to(self.device).eval()
        return self

    def __exit__(self, *exc: object) -> None:
        self._graphs.clear()

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

    def infer(self, batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return self._compute(self._to_device(batch)).float().cpu().numpy()

    def timed_infer(self, batch: np.ndarray) -> tuple[np.ndarray, dict[str, float]]:
        """``infer`` plus device-side milliseconds of ``h2d``, ``compute`` and ``d2h`` (CUDA only)."""
        if self.device.type != "cuda":
            raise MMExportError("device-side timing needs a CUDA device")
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
        timings = {
            "h2d": events[0].elapsed_time(events[1]),
            "compute": events[1].elapsed_time(events[2]),
            "d2h": events[2].elapsed_time(events[3]),
        }
        return host.numpy(), timings
