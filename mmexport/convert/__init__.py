"""Torch-free graph transforms: ONNX file operations, precision (fp16, int8 QDQ), the TensorRT builder.

Each module imports ``onnx``/``onnxruntime``/``tensorrt`` only when a transform runs,
so importing this package costs nothing.
"""
