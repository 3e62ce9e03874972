"""The loop-free NMS for devices (:func:`parallel_nms`) gives exactly the CPU loop's result (:func:`greedy_nms`).

Both are class-wise greedy NMS (IoU > thr suppressed, candidates in stable descending score order,
the first ``max_total`` survivors); the device one iterates a masked IoU matrix to its fixed point.
Checked on random and adversarial inputs: score ties, identical boxes, long suppression chains,
more than 1000 candidates, zero-area boxes, and no candidate at all.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from fcos_offline.model.postprocess import greedy_nms, parallel_nms  # noqa: E402


def _boxes(n: int, gen: torch.Generator, spread: float = 200.0) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=gen) * spread
    wh = torch.rand(n, 2, generator=gen) * 60 + 1
    return torch.cat([xy, xy + wh], dim=1)


def _same(boxes: torch.Tensor, scores: torch.Tensor, iou_thr: float = 0.5, score_thr: float = 0.05, max_total: int = 100) -> None:
    expected = greedy_nms(boxes, scores, iou_thr, score_thr, max_total)
    got = parallel_nms(boxes, scores, iou_thr, score_thr, max_total)
    assert torch.equal(got, expected), (got[:10], expected[:10])


@pytest.mark.parametrize("seed", range(6))
def test_random_batches(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    boxes = torch.stack([_boxes(300, gen) for _ in range(2)])
    scores = torch.rand(2, 5, 300, generator=gen)
    _same(boxes, scores, iou_thr=[0.3, 0.5, 0.6][seed % 3], max_total=[100, 20, 1000][seed % 3])


def test_score_ties_keep_the_loops_order() -> None:
    gen = torch.Generator().manual_seed(7)
    boxes = _boxes(400, gen, spread=80.0)[None]  # crowded: many overlaps
    scores = (torch.rand(1, 3, 400, generator=gen) * 4).round() / 4  # only 5 distinct values
    _same(boxes, scores)


def test_identical_and_zero_area_boxes() -> None:
    box = torch.tensor([[10.0, 10.0, 50.0, 60.0]])
    flat = torch.tensor([[5.0, 5.0, 5.0, 40.0]])  # zero width: IoU 0/0, never suppressed
    boxes = torch.cat([box.repeat(20, 1), flat.repeat(5, 1)])[None]
    scores = torch.full((1, 2, 25), 0.5)
    _same(boxes, scores)
    assert len(parallel_nms(boxes, scores, 0.5, 0.05, 100)) == 2 * (1 + 5)  # per class: one of the 20 copies, every flat box


def test_a_suppression_chain() -> None:
    """a suppresses b, b would suppress c: c survives (greedy), which one matrix step alone gets wrong."""
    boxes = torch.tensor([[[0.0, 0, 10, 10], [3, 0, 13, 10], [6, 0, 16, 10], [9, 0, 19, 10], [12, 0, 22, 10]]])
    scores = torch.tensor([[[0.9, 0.8, 0.7, 0.6, 0.5]]])
    _same(boxes, scores, iou_thr=0.3)
    kept = parallel_nms(boxes, scores, 0.3, 0.05, 100)[:, 2].tolist()
    assert kept == [0, 2, 4]


def test_more_than_a_thousand_candidates() -> None:
    gen = torch.Generator().manual_seed(11)
    boxes = _boxes(3000, gen, spread=600.0)[None]
    scores = torch.rand(1, 4, 3000, generator=gen)
    _same(boxes, scores, max_total=100)
    _same(boxes, scores, max_total=5000)


def test_no_candidate() -> None:
    boxes = torch.zeros(2, 10, 4)
    scores = torch.zeros(2, 3, 10)
    assert parallel_nms(boxes, scores, 0.5, 0.05, 100).shape == (0, 3)
    _same(boxes, scores)
