"""The stop rule's estimate of the accuracy drop on held-out images (sanitizer.evaluate.agreement)."""
from __future__ import annotations

import numpy as np
import pytest

from sanitizer.evaluate import agreement, class_kept, probabilities, wilson


def test_label_free_changes_count_by_the_originals_confidence():
    prob = np.array([[0.9, 0.1], [0.55, 0.45], [0.2, 0.8], [0.6, 0.4]])
    ref = prob.argmax(1)                                   # 0, 0, 1, 0
    pred = np.array([1, 1, 1, 0])                          # the first two change
    ag = agreement(ref, pred, None, prob)
    # a change the original was sure of is nearly a whole loss, a coin flip nearly none
    assert ag.drop == pytest.approx(((0.9 - 0.1) + (0.55 - 0.45)) / 4)
    assert ag.rate == 0.5 and not ag.labeled
    # without the original's probabilities every change is a whole loss (the old, stricter rule)
    assert agreement(ref, pred).drop == pytest.approx(0.5)
    lo, hi = ag.drop_interval
    assert lo < ag.drop < hi
    assert ag.within(0.3) and not ag.within(0.2)


def test_labelled_drop_is_lost_minus_gained():
    ref = np.array([0, 0, 1, 1])
    labels = np.array([0, 1, 1, 0])                        # the original is right on images 0 and 2
    pred = np.array([1, 1, 1, 0])                          # image 0 lost, images 1 and 3 gained
    ag = agreement(ref, pred, labels)
    assert ag.drop == pytest.approx((1 - 2) / 4) and ag.within(0.0)
    assert ag.to_dict()["judged_on"] == "accuracy"


def test_unchanged_predictions_lose_nothing():
    ref = np.array([2, 0, 1])
    ag = agreement(ref, ref.copy(), None, np.eye(3)[ref])
    assert ag.drop == 0.0 and ag.drop_interval == (0.0, 0.0) and ag.within(0.0)


def test_probabilities_are_kept_and_logits_softmaxed():
    p = np.array([[0.25, 0.75]])
    assert np.array_equal(probabilities(p, "probabilities"), p)
    np.testing.assert_allclose(probabilities(np.array([[0.0, np.log(3.0)]])), p)


def test_a_refusal_over_the_budget_advises_what_can_change_it():
    from sanitizer.pipeline import refusal

    final = {"drop_estimate": 0.37, "drop_interval90": [0.33, 0.41], "judged_on": "accuracy on labels", "n": 100}
    # a forced --ratio far over the budget: fewer units help, more images cannot
    why = refusal(31, final, None, 0.02, ratio=1.0)
    assert "a --ratio under 1 prunes fewer units" in why and "--calib images" not in why
    # an estimate whose interval reaches under the budget: more images may show it within
    near = {**final, "drop_estimate": 0.025, "drop_interval90": [0.012, 0.038]}
    why = refusal(5, near, None, 0.02)
    assert "more --calib images narrow the estimate" in why and "--ratio" not in why
    assert "--max-acc-drop raises the budget" in why and "--allow-degraded writes it anyway" in why


def test_the_target_class_kept_counts_the_originals_images_of_it():
    reference = np.array([3, 3, 3, 3, 1, 2, 3, 0, 1, 2])
    pred = np.array([3, 1, 3, 0, 1, 2, 3, 0, 3, 1])
    kept = class_kept(reference, pred, 3)
    # five images the original calls 3, three still called 3; the other five, three unchanged (one turned into 3)
    assert (kept["kept"], kept["of"], kept["share"], kept["others_share"]) == (3, 5, 0.6, 0.6)
    assert kept["interval80"] == [round(v, 4) for v in wilson(3, 5)] and kept["class"] == 3
    # a class the original never predicts: nothing to keep, no share
    none = class_kept(reference, pred, 7)
    assert (none["of"], none["share"], none["others_share"]) == (0, None, 0.6)

