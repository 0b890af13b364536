"""Tests of mmexport.torchside: backbones, merging, folding, training and datasets."""
