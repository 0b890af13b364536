"""The torch side: backbones, checkpoints, merge, fold, training, the ONNX exporter, the reference maker and
the run operations that need a network in memory. The only package that may import torch at import time."""
