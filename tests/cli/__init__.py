"""Tests that drive the mmexport command line across sides: commands, hostile use, kill -9 faults."""
