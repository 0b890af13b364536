"""Tests of mmexport.runtime: the torch-free deployment side."""
