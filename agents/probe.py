"""The pooled linear probe: what a feature file allows a simple reader to reach.

A scikit-learn logistic regression on the mean of the frames a selection policy picks (by
default ``uniform-25``: every locator's uniform 25% of its segment, pooled over all locators),
standardized with train-split statistics and fit on the train split. It is the reference that
every run prints next to ViMo's rows (``"probe"`` in ``results.json``) and the yardstick of the
Stage I self-check (:func:`stage1_health`): a recognizer far below it is broken, not limited by
the data.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable

import numpy as np

from agents.metrics import mean_average_precision, top1_accuracy
from agents.selection import gather_padded, select_frames
from features.source import FrameSource

#: Stage I must reach this fraction of the probe's mAP on the same frames (issue figure: 0.9).
HEALTHY_FRACTION = 0.9


def pooled_features(source: FrameSource, num_locators: int, policy: str, seed: int = 0,
                    batch_size: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Mean over the selected frames of every video, float64 ``[V, D]``, and how many frames
    each video's mean took, int ``[V]``."""
    rng = np.random.default_rng(seed)
    frame_index, mask = select_frames(source.lengths, num_locators, policy, rng)
    pooled = np.zeros((source.num_videos, source.feature_dim))
    for lo in range(0, source.num_videos, batch_size):
        hi = min(lo + batch_size, source.num_videos)
        frames = gather_padded(source, np.arange(lo, hi), frame_index[lo:hi]).double().cpu()
        m = mask[lo:hi].reshape(hi - lo, -1)
        flat = frames.reshape(hi - lo, -1, source.feature_dim).numpy()
        pooled[lo:hi] = (flat * m[..., None]).sum(1) / m.sum(1, keepdims=True)
    return pooled, mask.sum(axis=(1, 2))


def pooled_classifier(x_train: np.ndarray, labels: np.ndarray, c: float = 1.0,
                      max_iter: int = 500, tol: float = 1e-3
                      ) -> Callable[[np.ndarray, int], np.ndarray]:
    """Standardize pooled features with train statistics and fit a scikit-learn logistic
    regression; returns ``predict(x [V, D], num_classes) -> scores [V, C]`` (classes absent
    from the train labels score 0)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(x_train)
    model = LogisticRegression(C=c, max_iter=max_iter, tol=tol)
    with warnings.catch_warnings():  # an unconverged fit is still a fair reference
        warnings.simplefilter("ignore")
        model.fit(scaler.transform(x_train), labels)

    def predict(x: np.ndarray, num_classes: int) -> np.ndarray:
        scores = np.zeros((len(x), num_classes))
        scores[:, model.classes_] = model.predict_proba(scaler.transform(x))
        return scores

    return predict


def linear_probe(train: FrameSource, evaluate: dict[str, FrameSource], num_locators: int = 3,
                 policy: str = "uniform-25", seed: int = 0, c: float = 1.0) -> dict:
    """Fit the probe on ``train`` and score it on each source of ``evaluate``.

    Returns ``{"policy", "fit_s", <split>: {"mAP", "top1", "frames_per_video", "frame_rate",
    "gflops_per_video"}}``; the cost is that of the frames the policy picks (the probe's own
    cost, one linear map per video, is negligible and not counted).
    """
    t0 = time.perf_counter()
    predict = pooled_classifier(pooled_features(train, num_locators, policy, seed)[0],
                                train.labels, c=c)
    result: dict = {"policy": policy, "fit_s": time.perf_counter() - t0}
    for split, source in evaluate.items():
        pooled, per_video = pooled_features(source, num_locators, policy, seed)
        scores = predict(pooled, source.num_classes)
        result[split] = {
            "mAP": mean_average_precision(scores, source.labels),
            "top1": top1_accuracy(scores, source.labels),
            "frames_per_video": float(per_video.mean()),
            "frame_rate": float(100.0 * np.mean(per_video / source.lengths)),
            "gflops_per_video": float(per_video.mean() * source.gflops_per_frame),
        }
    return result


def stage1_health(stage1_map: float, probe_map: float, num_classes: int,
                  fraction: float = HEALTHY_FRACTION) -> dict:
    """The Stage I self-check: is the recognizer within ``fraction`` of the probe's mAP?

    Returns ``{"healthy", "ratio", "chance_mAP", "diagnosis"}``; the diagnosis says what the
    gap most likely means, so a user does not spend the SAC budget on a broken recognizer.
    """
    chance = 100.0 / max(num_classes, 1)
    ratio = stage1_map / probe_map if probe_map > 0 else 0.0
    healthy = ratio >= fraction
    if healthy:
        diagnosis = "Stage I is within reach of the linear probe."
    elif stage1_map < chance + 0.25 * (probe_map - chance):
        diagnosis = (
            "Stage I stayed near chance while a linear probe on the same frames learns: the "
            "recognizer did not train (learning rate, too few gradient steps, or features whose "
            "scale the normalization could not fix). Check the Stage I loss in train/tb.")
    else:
        diagnosis = (
            "Stage I learned but stays well below a linear probe on the same frames: it is "
            "under-trained or over-fits (try more Stage I steps, or a simpler F_T / F_M).")
    return {"healthy": bool(healthy), "ratio": float(ratio), "chance_mAP": chance,
            "diagnosis": diagnosis}
