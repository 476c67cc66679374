"""The 2018 Data Science Bowl metric, as one standalone module everything reuses.

For one image: at each IoU threshold t in 0.50, 0.55, ..., 0.95 a predicted nucleus matches a
true one when their IoU exceeds t (for t >= 0.5 a nucleus can match at most one other), and the
image scores the mean over t of TP / (TP + FP + FN). The data set score is the mean over images.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

THRESHOLDS = np.round(np.arange(0.5, 1.0, 0.05), 2)


def iou_matrix(true: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """IoU between every true (rows) and predicted (columns) instance; labels 1..N, 0 background."""
    true = true.astype(np.int64).ravel()
    pred = pred.astype(np.int64).ravel()
    n_true, n_pred = int(true.max(initial=0)), int(pred.max(initial=0))
    overlap = np.bincount(true * (n_pred + 1) + pred, minlength=(n_true + 1) * (n_pred + 1))
    overlap = overlap.reshape(n_true + 1, n_pred + 1)
    area_true = overlap.sum(axis=1, keepdims=True)
    area_pred = overlap.sum(axis=0, keepdims=True)
    union = area_true + area_pred - overlap
    iou = overlap / np.maximum(union, 1)
    # label ids that do not occur (gaps in the numbering) are not nuclei
    return iou[1:, 1:][area_true[1:, 0] > 0][:, area_pred[0, 1:] > 0]


@dataclass(frozen=True)
class ImageScore:
    """Instance metrics of one image."""

    score: float  # DSB2018: mean over thresholds of TP / (TP + FP + FN)
    ap50: float  # TP / (TP + FP + FN) at IoU 0.5
    n_true: int
    n_pred: int
    pixel_iou: float
    dice: float
    tp50: int  # the counts behind ap50: summed over images they give the pooled AP@0.5 (``pooled_ap50``)
    fp50: int
    fn50: int


def ap_ratio(tp: int, fp: int, fn: int) -> float:
    """TP / (TP + FP + FN), the competition's value at one IoU threshold; 1 when no nucleus is true or predicted."""
    return 1.0 if tp + fp + fn == 0 else float(tp / (tp + fp + fn))


def precision_at(iou: np.ndarray, threshold: float) -> tuple[int, int, int]:
    """(TP, FP, FN) at one IoU threshold."""
    matches = iou > threshold
    tp = int(np.count_nonzero(matches.any(axis=1)))
    fn = iou.shape[0] - tp
    fp = iou.shape[1] - int(np.count_nonzero(matches.any(axis=0)))
    return tp, fp, fn


def score_image(true: np.ndarray, pred: np.ndarray, iou: np.ndarray | None = None) -> ImageScore:
    """All metrics of one prediction against the truth (both instance label images); ``iou``, their
    ``iou_matrix`` where the caller already has it, so that it is not computed twice."""
    if true.shape != pred.shape:
        raise ValueError(f"shape mismatch: truth {true.shape} vs prediction {pred.shape}")
    iou = iou_matrix(true, pred) if iou is None else iou
    n_true, n_pred = iou.shape
    counts = [precision_at(iou, t) for t in THRESHOLDS]
    ratios = [ap_ratio(*c) for c in counts]
    tp50, fp50, fn50 = counts[0]
    fg_true, fg_pred = true > 0, pred > 0
    inter = np.count_nonzero(fg_true & fg_pred)
    union = np.count_nonzero(fg_true | fg_pred)
    total = np.count_nonzero(fg_true) + np.count_nonzero(fg_pred)
    return ImageScore(
        score=float(np.mean(ratios)),
        ap50=float(ratios[0]),
        n_true=n_true,
        n_pred=n_pred,
        pixel_iou=1.0 if union == 0 else inter / union,
        dice=1.0 if total == 0 else 2.0 * inter / total,
        tp50=tp50,
        fp50=fp50,
        fn50=fn50,
    )


def matched_predictions(true: np.ndarray, pred: np.ndarray, threshold: float = 0.5,
                        iou: np.ndarray | None = None) -> np.ndarray:
    """Whether each predicted nucleus 1..N (numbered without gaps, as the service numbers them)
    matches a true nucleus at IoU above ``threshold``: the TP (True) and FP (False) of the metric.
    ``iou`` as in ``score_image``."""
    iou = iou_matrix(true, pred) if iou is None else iou
    if iou.shape[1] != int(pred.max(initial=0)):
        raise ValueError("predicted labels must be numbered 1..N without gaps")
    return (iou > threshold).any(axis=0)


def pooled_ap50(counts: Iterable[tuple[int, int, int]]) -> float:
    """TP / (TP + FP + FN) at IoU 0.5 from per-image (TP, FP, FN), summed over images first.

    The DSB2018 score averages per image, so an image of 3 nuclei weighs as much as one of 300;
    pooling weighs every nucleus alike, as StarDist's ``matching_dataset`` and its paper's table
    of DSB2018 results do, which makes our numbers comparable with theirs.
    """
    return ap_ratio(*np.asarray(list(counts), dtype=np.int64).reshape(-1, 3).sum(axis=0))


def dsb_score(pairs: list[tuple[np.ndarray, np.ndarray]]) -> float:
    """Mean DSB2018 score over (truth, prediction) pairs."""
    return float(np.mean([score_image(t, p).score for t, p in pairs])) if pairs else float("nan")
