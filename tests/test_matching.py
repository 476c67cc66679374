"""The DSB2018 metric on hand-made cases with known answers."""

import numpy as np
import pytest

from tests.synthetic import disc_labels
from training.matching import THRESHOLDS, iou_matrix, matched_predictions, pooled_ap50, score_image

SHAPE = (40, 60)
TRUTH = disc_labels(SHAPE, [(10, 10), (10, 40), (30, 25)], 6)


def test_perfect_match_scores_one():
    s = score_image(TRUTH, TRUTH)
    assert s.score == 1.0 and s.ap50 == 1.0 and s.n_true == s.n_pred == 3


def test_one_missed_nucleus():
    pred = TRUTH.copy()
    pred[pred == 3] = 0
    s = score_image(TRUTH, pred)
    assert s.score == pytest.approx(2 / 3)  # TP 2, FN 1 at every threshold


def test_one_nucleus_split_in_two():
    pred = TRUTH.copy()
    nucleus = pred == 1
    cols = np.nonzero(nucleus)[1]
    pred[nucleus & (np.arange(SHAPE[1])[None, :] > np.median(cols))] = 4
    s = score_image(TRUTH, pred)
    iou = iou_matrix(TRUTH, pred)
    assert 0.5 < iou[0, 0] < 0.6 and iou[0, 3] < 0.5  # the larger half still matches at IoU 0.5
    assert s.ap50 == pytest.approx(3 / 4)  # TP 3, FP 1 (the smaller half), FN 0
    assert s.score < 0.5  # above IoU 0.55 the split nucleus is lost: TP 2, FP 2, FN 1
    assert s.n_pred == 4
    assert (s.tp50, s.fp50, s.fn50) == (3, 1, 0)


def test_two_nuclei_merged():
    truth = disc_labels(SHAPE, [(20, 20), (20, 31)], 6)
    pred = (truth > 0).astype(np.int32)
    pred[20, 20:32] = 1  # one blob covering both
    s = score_image(truth, pred)
    # the blob has IoU about 0.5 with each: never above 0.5 for both, TP <= 1, so score <= 1/2
    assert s.ap50 <= 0.5
    assert s.n_pred == 1


def test_empty_prediction_scores_zero_and_both_empty_scores_one():
    empty = np.zeros(SHAPE, np.int32)
    assert score_image(TRUTH, empty).score == 0.0
    assert score_image(empty, empty).score == 1.0


def test_iou_threshold_is_strict_and_averaged():
    # a prediction with IoU exactly between thresholds counts only below it
    truth = np.zeros((1, 100), np.int32)
    truth[0, :100] = 1
    pred = np.zeros((1, 100), np.int32)
    pred[0, :72] = 1  # IoU 0.72: TP at 0.50..0.70 (5 thresholds), FP+FN above
    s = score_image(truth, pred)
    assert s.score == pytest.approx(5 / len(THRESHOLDS))
    assert iou_matrix(truth, pred)[0, 0] == pytest.approx(0.72)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError):
        score_image(TRUTH, TRUTH[:-1])


def test_gaps_in_label_numbers_are_not_nuclei():
    gappy = TRUTH.copy()
    gappy[gappy == 2] = 7  # ids 1, 3, 7: ids 2, 4, 5, 6 are absent
    s = score_image(gappy, TRUTH)
    assert s.score == 1.0 and s.n_true == 3


def test_pooled_ap50_weighs_every_nucleus_not_every_image():
    perfect = score_image(TRUTH, TRUTH)  # TP 3
    missed = TRUTH.copy()
    missed[missed > 1] = 0
    one_of_three = score_image(TRUTH, missed)  # TP 1, FN 2: AP@0.5 1/3
    counts = [(s.tp50, s.fp50, s.fn50) for s in (perfect, one_of_three)]
    assert pooled_ap50(counts) == pytest.approx(4 / 6)  # (3 + 1) / (3 + 1 + 2)
    assert (perfect.ap50 + one_of_three.ap50) / 2 == pytest.approx(2 / 3)  # the per-image mean
    small = score_image(TRUTH[:, :18], missed[:, :18])  # one true nucleus, found: AP@0.5 1
    assert pooled_ap50([(small.tp50, small.fp50, small.fn50), counts[1]]) == pytest.approx(2 / 4)
    assert pooled_ap50([]) == 1.0


def test_matched_predictions_marks_each_predicted_nucleus_right_or_false():
    pred = TRUTH.copy()
    pred[pred == 2] = 0
    pred[35:40, 50:60] = 2  # a nucleus where there is none
    pred[(pred == 3) & (np.arange(SHAPE[1])[None, :] < 28)] = 0  # a quarter of nucleus 3: IoU under 0.5
    assert matched_predictions(TRUTH, pred).tolist() == [True, False, False]
    assert matched_predictions(TRUTH, pred, 0.1).tolist() == [True, False, True]
    assert matched_predictions(TRUTH, TRUTH).tolist() == [True, True, True]
    assert matched_predictions(TRUTH, np.zeros(SHAPE, np.int32)).shape == (0,)
    iou = iou_matrix(TRUTH, pred)  # a matrix the caller already has gives the same answers
    assert matched_predictions(TRUTH, pred, 0.1, iou=iou).tolist() == [True, False, True]
    assert score_image(TRUTH, pred, iou) == score_image(TRUTH, pred)
    gappy = TRUTH.copy()
    gappy[gappy == 2] = 7
    with pytest.raises(ValueError, match="without gaps"):
        matched_predictions(TRUTH, gappy)
