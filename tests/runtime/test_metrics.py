"""Classification metrics (mmexport.runtime.metrics): the confusion matrix and macro F1."""

import numpy as np

from mmexport.runtime.metrics import classification_metrics, confusion_matrix


def test_confusion_matrix_rows_are_true_classes():
    matrix = confusion_matrix(np.array([0, 0, 1, 2]), np.array([0, 1, 1, 1]), 3)
    assert matrix.tolist() == [[1, 1, 0], [0, 1, 0], [0, 1, 0]]


def test_macro_f1_matches_hand_computation():
    labels = np.array([0, 0, 0, 0, 1, 1, 2])
    predictions = np.array([0, 0, 0, 1, 1, 0, 0])
    # class 0: P=3/5 R=3/4 F1=2/3; class 1: P=1/2 R=1/2 F1=1/2; class 2: never predicted, F1=0
    result = classification_metrics(labels, predictions, 3)
    assert np.isclose(result["macro_f1"], (2 / 3 + 1 / 2 + 0) / 3)
    assert np.isclose(result["accuracy"], 4 / 7)
    assert result["per_class"]["support"] == [4.0, 2.0, 1.0]
    assert result["num_samples"] == 7


def test_macro_f1_penalises_ignoring_a_rare_class_unlike_accuracy():
    labels = np.array([0] * 95 + [1] * 5)
    always_majority = np.zeros(100, dtype=int)
    result = classification_metrics(labels, always_majority, 2)
    assert result["accuracy"] == 0.95
    assert result["macro_f1"] < 0.5
