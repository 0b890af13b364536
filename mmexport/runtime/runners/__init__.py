"""Runners: one contract (``base``), one module per backend, each imported on first use."""
