from __future__ import annotations

import numpy as np
import torch
from torch import nn


class TorchRunner:
    """Runs an ``nn.Module`` in eval mode under ``inference_mode`` on a chosen device."""

    def __init__(self, module: nn.Module, name: str = "torch", device: str | torch.device = "cpu") -> None:
        self.name = name
        self.device = torch.device(device)
        self.module = module

    def __enter__(self) -> "TorchRunner":
        self.module = self.module.to(self.device).eval()
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def infer(self, batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            inputs = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self.device)
            return self.module(inputs).float().cpu().numpy()
