"""Letterbox geometry: spec §8.2 sizes and pads, exact round trip, the recipe rule's bounded error."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fcos_offline.data.letterbox import boxes_to_canvas, boxes_to_original, letterbox_for
from fcos_offline.errors import FcosError


@pytest.mark.parametrize(
    ("w", "h", "new_w", "new_h"),
    [(640, 480, 1066, 800), (500, 375, 1066, 800), (640, 427, 1199, 800), (427, 640, 533, 800)],
)
def test_spec_worked_sizes(w, h, new_w, new_h):
    """Spec §8.3, Huawei column."""
    lb = letterbox_for(w, h, 800, 1333)
    assert (lb.new_w, lb.new_h) == (new_w, new_h)
    assert lb.pad_left == (1333 - new_w) // 2
    assert lb.pad_top == (800 - new_h) // 2
    assert lb.scale == min(1333 / w, 800 / h)


def test_degenerate_image_is_an_error():
    with pytest.raises(FcosError, match="shrinks"):
        letterbox_for(5000, 1, 800, 1333)


sizes = st.integers(min_value=8, max_value=4000)


@st.composite
def image_and_boxes(draw):
    w, h = draw(sizes), draw(sizes)
    canvas_h = draw(st.integers(min_value=32, max_value=1400))
    canvas_w = draw(st.integers(min_value=32, max_value=1400))
    n = draw(st.integers(min_value=1, max_value=8))
    xs = draw(st.lists(st.floats(0, w, allow_nan=False), min_size=2 * n, max_size=2 * n))
    ys = draw(st.lists(st.floats(0, h, allow_nan=False), min_size=2 * n, max_size=2 * n))
    x = np.sort(np.array(xs).reshape(n, 2), axis=1)
    y = np.sort(np.array(ys).reshape(n, 2), axis=1)
    boxes = np.stack([x[:, 0], y[:, 0], x[:, 1], y[:, 1]], axis=1)
    return w, h, canvas_h, canvas_w, boxes


def _letterbox_or_skip(w, h, canvas_h, canvas_w):
    try:
        return letterbox_for(w, h, canvas_h, canvas_w)
    except FcosError:
        return None


@settings(max_examples=300, deadline=None)
@given(image_and_boxes())
def test_exact_rule_round_trip(case):
    w, h, canvas_h, canvas_w, boxes = case
    lb = _letterbox_or_skip(w, h, canvas_h, canvas_w)
    if lb is None:
        return
    canvas = boxes_to_canvas(boxes, lb)
    # the image region is where boxes land
    assert canvas[:, [0, 2]].min() >= lb.pad_left - 1e-6
    assert canvas[:, [0, 2]].max() <= lb.pad_left + lb.new_w + 1e-6
    assert canvas[:, [1, 3]].max() <= lb.pad_top + lb.new_h + 1e-6
    np.testing.assert_allclose(boxes_to_original(canvas, lb, "exact"), boxes, atol=1e-3, rtol=0)


@settings(max_examples=300, deadline=None)
@given(image_and_boxes())
def test_recipe_rule_is_within_one_over_scale(case):
    """The float pad is at most 1 px smaller and s >= w'/w: error in [-1/s, 1/s] original px."""
    w, h, canvas_h, canvas_w, boxes = case
    lb = _letterbox_or_skip(w, h, canvas_h, canvas_w)
    if lb is None:
        return
    canvas = boxes_to_canvas(boxes, lb)
    diff = boxes_to_original(canvas, lb, "recipe") - boxes
    assert np.abs(diff).max() <= 1 / lb.scale + 1e-6
    # the recipe's pad can only be smaller, never larger, than the true one
    recipe_pad_left = (canvas_w - w * lb.scale) // 2
    assert 0 <= lb.pad_left - recipe_pad_left <= 1


def test_recipe_rule_differs_from_exact_on_a_real_size():
    """427x640 on 800x1333: recipe pad floor((1333 - 533.75)/2) = 399 vs 400, ratio 533/427 vs s = 1.25."""
    lb = letterbox_for(427, 640, 800, 1333)
    assert lb.pad_left == 400 and (1333 - 427 * lb.scale) // 2 == 399
    box = np.array([[100.0, 50.0, 400.0, 600.0]])
    exact = boxes_to_original(boxes_to_canvas(box, lb), lb, "exact")
    recipe = boxes_to_original(boxes_to_canvas(box, lb), lb, "recipe")
    np.testing.assert_allclose(exact, box, atol=1e-9)
    assert not np.allclose(recipe, box, atol=1e-3)
    assert math.isclose(lb.ratio_x, 533 / 427)


def test_extra_columns_kept_and_bad_rule():
    lb = letterbox_for(640, 480, 800, 1333)
    dets = np.array([[10.0, 20.0, 30.0, 40.0, 0.9]], dtype=np.float32)
    out = boxes_to_original(dets, lb)
    assert out.shape == (1, 5) and out[0, 4] == pytest.approx(0.9)
    with pytest.raises(ValueError, match="rule"):
        boxes_to_original(dets, lb, "nearest")
