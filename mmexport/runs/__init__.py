"""A run directory (torch-free): its manifest and lock, verification of its artifacts, provenance, inspection,
and the TensorRT build glue that publishes engines into it."""
