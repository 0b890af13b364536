"""Classification metrics for imbalanced medical sets (macro F1 is the headline).

A confusion matrix is all these need; numpy keeps scikit-learn (and SciPy) out
of the core dependencies. Definitions match ``sklearn.metrics`` with
``zero_division=0``.
"""

from __future__ import annotations

import numpy as np


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """Rows: true class, columns: predicted class."""
    labels = np.asarray(labels, dtype=np.int64)
    predictions = np.asarray(predictions, dtype=np.int64)
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (labels, predictions), 1)
    return matrix


def per_class_scores(matrix: np.ndarray) -> dict[str, np.ndarray]:
    true_positive = np.diag(matrix).astype(np.float64)
    predicted = matrix.sum(axis=0).astype(np.float64)
    actual = matrix.sum(axis=1).astype(np.float64)
    precision = np.divide(true_positive, predicted, out=np.zeros_like(true_positive), where=predicted > 0)
    recall = np.divide(true_positive, actual, out=np.zeros_like(true_positive), where=actual > 0)
    denominator = precision + recall
    f1 = np.divide(2 * precision * recall, denominator, out=np.zeros_like(true_positive), where=denominator > 0)
    return {"precision": precision, "recall": recall, "f1": f1, "support": actual}


def classification_metrics(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> dict:
    """Accuracy, macro F1 (mean over all classes), per-class scores and the confusion matrix."""
    matrix = confusion_matrix(labels, predictions, num_classes)
    scores = per_class_scores(matrix)
    total = matrix.sum()
    return {
        "accuracy": float(np.trace(matrix) / total) if total else 0.0,
        "macro_f1": float(scores["f1"].mean()),
        "per_class": {key: value.tolist() for key, value in scores.items()},
        "confusion_matrix": matrix.tolist(),
        "num_samples": int(total),
    }
