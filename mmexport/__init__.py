"""mmexport: MedMerge training, fold, verification and export of merged CNN backbones."""

__version__ = "0.3.0"
