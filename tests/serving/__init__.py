"""Tests of mmexport.serving: Triton model repositories and server."""
