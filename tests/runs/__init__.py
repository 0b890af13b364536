"""Tests of mmexport.runs: run directories, their lock, verification and provenance."""
