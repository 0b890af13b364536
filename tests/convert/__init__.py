"""Tests of mmexport.convert: ONNX precision transforms and the TensorRT builder."""
