"""The instance metrics, as one standalone module everything reuses.

DSB2018: for one image, at each IoU threshold t in 0.50, 0.55, ..., 0.95 a predicted nucleus
matches a true one when their IoU exceeds t (for t >= 0.5 a nucleus can match at most one other),
and the image scores the mean over t of TP / (TP + FP + FN). The data set score is the mean over images.

AJI (aggregated Jaccard index, MoNuSeg's metric, Kumar et al. 2017): each true nucleus is paired
with the predicted one of highest IoU; the intersections of the pairs are summed, and so are
their unions plus the area of every prediction no true nucleus chose. The data set score is the
mean over images, as the MoNuSeg challenge ranks it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

THRESHOLDS = np.round(np.arange(0.5, 1.0, 0.05), 2)


@dataclass(frozen=True)
class Overlaps:
    """Pixel counts shared by every true (rows) and predicted (columns) instance, and their areas.

    Label ids that do not occur (gaps in the numbering) are not nuclei and have no row or column.
    """

    intersection: np.ndarray  # (n_true, n_pred) int64
    area_true: np.ndarray  # (n_true,)
    area_pred: np.ndarray  # (n_pred,)

    @property
    def union(self) -> np.ndarray:
        return self.area_true[:, None] + self.area_pred[None, :] - self.intersection

    @property
    def iou(self) -> np.ndarray:
        return self.intersection / np.maximum(self.union, 1)


def overlaps(true: np.ndarray, pred: np.ndarray) -> Overlaps:
    """The :class:`Overlaps` of two instance label images (labels 1..N, 0 background), in one bincount."""
    true = true.astype(np.int64).ravel()
    pred = pred.astype(np.int64).ravel()
    n_true, n_pred = int(true.max(initial=0)), int(pred.max(initial=0))
    counts = np.bincount(true * (n_pred + 1) + pred, minlength=(n_true + 1) * (n_pred + 1))
    counts = counts.reshape(n_true + 1, n_pred + 1)
    area_true, area_pred = counts.sum(axis=1), counts.sum(axis=0)
    rows, cols = area_true[1:] > 0, area_pred[1:] > 0
    return Overlaps(counts[1:, 1:][rows][:, cols], area_true[1:][rows], area_pred[1:][cols])


def iou_matrix(true: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """IoU between every true (rows) and predicted (columns) instance; labels 1..N, 0 background."""
    return overlaps(true, pred).iou


def aggregated_jaccard(counts: Overlaps) -> float:
    """MoNuSeg's AJI of one image from its :class:`Overlaps` (1 when nothing is true or predicted).

    Each true nucleus takes the prediction of highest IoU (a prediction may be taken by several,
    as in Kumar et al.'s definition; a true nucleus that overlaps nothing adds its own area to the
    union); predictions taken by none add their area to the union. Unlike the DSB2018 score, a
    merged or split nucleus costs in proportion to its pixels, not its count.
    """
    n_true, n_pred = counts.intersection.shape
    if n_true == 0:
        return 1.0 if n_pred == 0 else 0.0
    if n_pred == 0:
        return 0.0
    best = np.argmax(counts.iou, axis=1)
    rows = np.arange(n_true)
    inter = counts.intersection[rows, best]
    union = np.where(inter > 0, counts.union[rows, best], counts.area_true)
    taken = np.zeros(n_pred, bool)
    taken[best[inter > 0]] = True
    return float(inter.sum() / (union.sum() + counts.area_pred[~taken].sum()))


@dataclass(frozen=True)
class ImageScore:
    """Instance metrics of one image."""

    score: float  # DSB2018: mean over thresholds of TP / (TP + FP + FN)
    ap50: float  # TP / (TP + FP + FN) at IoU 0.5
    aji: float  # MoNuSeg's aggregated Jaccard index
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


def score_image(true: np.ndarray, pred: np.ndarray, counts: Overlaps | None = None) -> ImageScore:
    """All metrics of one prediction against the truth (both instance label images); ``counts``, their
    ``overlaps`` where the caller already has them, so that they are not computed twice."""
    if true.shape != pred.shape:
        raise ValueError(f"shape mismatch: truth {true.shape} vs prediction {pred.shape}")
    counts = overlaps(true, pred) if counts is None else counts
    iou = counts.iou
    n_true, n_pred = iou.shape
    per_threshold = [precision_at(iou, t) for t in THRESHOLDS]
    ratios = [ap_ratio(*c) for c in per_threshold]
    tp50, fp50, fn50 = per_threshold[0]
    fg_true, fg_pred = true > 0, pred > 0
    inter = np.count_nonzero(fg_true & fg_pred)
    union = np.count_nonzero(fg_true | fg_pred)
    total = np.count_nonzero(fg_true) + np.count_nonzero(fg_pred)
    return ImageScore(
        score=float(np.mean(ratios)),
        ap50=float(ratios[0]),
        aji=aggregated_jaccard(counts),
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
