"""The DSB2018 metric on hand-made cases with known answers."""

import numpy as np
import pytest

from tests.synthetic import disc_labels
from training.matching import (THRESHOLDS, aggregated_jaccard, iou_matrix, matched_predictions, overlaps, pooled_ap50,
                               score_image)

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
    counts = overlaps(TRUTH, pred)  # counts the caller already has give the same answers
    assert matched_predictions(TRUTH, pred, 0.1, iou=counts.iou).tolist() == [True, False, True]
    assert score_image(TRUTH, pred, counts) == score_image(TRUTH, pred)
    gappy = TRUTH.copy()
    gappy[gappy == 2] = 7
    with pytest.raises(ValueError, match="without gaps"):
        matched_predictions(TRUTH, gappy)


def test_aji_by_hand():
    """Two true squares of 100 px; one prediction covers the first exactly, one covers half of the
    second (50 px) and 50 px of background, and a false one of 30 px lies elsewhere."""
    truth = np.zeros((40, 60), np.int32)
    truth[0:10, 0:10] = 1
    truth[20:30, 20:30] = 2
    pred = np.zeros_like(truth)
    pred[0:10, 0:10] = 1
    pred[20:30, 25:35] = 2  # 50 px inside nucleus 2, 50 outside
    pred[35:38, 50:60] = 3  # 30 px false
    # intersections 100 + 50; unions 100 + 150, plus the untaken 30 px
    assert aggregated_jaccard(overlaps(truth, pred)) == pytest.approx(150 / 280)
    assert score_image(truth, pred).aji == pytest.approx(150 / 280)
    assert score_image(truth, truth).aji == 1.0
    empty = np.zeros_like(truth)
    assert score_image(empty, empty).aji == 1.0 and score_image(truth, empty).aji == 0.0
    assert score_image(empty, pred).aji == 0.0


def test_aji_charges_a_merge_by_pixels_and_lets_two_truths_take_one_prediction():
    truth = np.zeros((20, 40), np.int32)
    truth[5:15, 5:15] = 1
    truth[5:15, 15:25] = 2
    merged = (truth > 0).astype(np.int32)  # one prediction over both
    # both truths take the merged prediction: intersections 100 + 100, unions 200 + 200
    assert score_image(truth, merged).aji == pytest.approx(0.5)
    assert score_image(truth, merged).ap50 == 0.0  # the DSB2018 count sees no match at all
    missing = truth.copy()
    missing[missing == 2] = 0  # a true nucleus that overlaps nothing adds its own area to the union
    assert score_image(truth, missing).aji == pytest.approx(100 / 200)
    gappy = truth * 5  # ids 5 and 10: gaps are not nuclei
    assert score_image(gappy, truth).aji == 1.0
