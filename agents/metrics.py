"""Video-level recognition metrics: mAP and top-1 in percent (mAP with scikit-learn), and the mean
probability of the true class in [0, 1]."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import average_precision_score


def _check(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels)
    if scores.ndim != 2:
        raise ValueError(f"scores must be [V, C], got shape {scores.shape}")
    if labels.shape != (scores.shape[0],):
        raise ValueError(f"labels must be [V] with V={scores.shape[0]}, got shape {labels.shape}")
    if len(labels) == 0:
        raise ValueError("scores/labels: no videos")
    if not np.isfinite(scores).all():
        raise ValueError("scores: contains NaN or Inf")
    if labels.min() < 0 or labels.max() >= scores.shape[1]:
        raise ValueError(f"labels: values must be in [0, {scores.shape[1]}), got "
                         f"[{labels.min()}, {labels.max()}]")
    return scores, labels.astype(np.int64)


def mean_average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mean over classes of the average precision of video-level scores, in percent.

    ``scores[V, C]`` are per-video class scores (softmax probabilities), ``labels[V]`` the true
    class indices. Per class, AP is scikit-learn's ``average_precision_score`` of the one-vs-rest
    problem; classes with no positive video in ``labels`` are skipped (their AP is undefined),
    as ActivityNet-style evaluations of a subset do.
    """
    scores, labels = _check(scores, labels)
    present = np.unique(labels)
    aps = [average_precision_score(labels == c, scores[:, c]) for c in present]
    return float(100.0 * np.mean(aps))


def top1_accuracy(scores: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of videos whose highest score is the true class, in percent."""
    scores, labels = _check(scores, labels)
    return float(100.0 * np.mean(scores.argmax(axis=1) == labels))


def mean_true_class_probability(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mean over videos of the score of the true class, in [0, 1] for softmax scores: the
    final ``P_gt`` that the env's team reward sums to (model selection, bounds)."""
    scores, labels = _check(scores, labels)
    return float(scores[np.arange(len(labels)), labels].mean())
