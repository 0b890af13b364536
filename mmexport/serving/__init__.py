"""Serving (torch-free): Triton model configurations as data, the model-repository writer, the Python model
Triton runs, and the server launcher behind ``mmexport serve``."""
