"""Click simulation (SPEC §10): exact distances, rule semantics, determinism under a seed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from fastsam3d.errors import FastSAM3DError
from fastsam3d.simulate import distance_to_outside, next_click


def _ball(
    shape: tuple[int, int, int], centre: tuple[float, float, float], r: float
) -> torch.Tensor:
    grid = torch.stack(torch.meshgrid(*[torch.arange(s) for s in shape], indexing="ij"))
    c = torch.tensor(centre).view(3, 1, 1, 1)
    return ((grid - c) ** 2).sum(0) <= r * r


def test_distance_matches_scipy_with_zero_border() -> None:
    rng = np.random.default_rng(0)
    mask = ndimage.binary_dilation(rng.random((20, 17, 23)) > 0.93, iterations=2)
    mask[0, :, :5] = True  # touches the border: outside counts as background
    ours = distance_to_outside(torch.from_numpy(mask)).numpy()
    ref = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1, 1:-1]
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    assert distance_to_outside(torch.zeros(4, 4, 4, dtype=torch.bool)).sum() == 0


def test_first_click_is_inside_the_object_and_positive() -> None:
    gt = torch.stack([_ball((24, 24, 24), (8, 12, 15), 5), _ball((24, 24, 24), (16, 10, 9), 3)])
    pred = torch.zeros_like(gt)
    for rule in ("ritm", "random"):
        points, labels = next_click(pred, gt, rule=rule, generator=torch.Generator().manual_seed(1))
        assert points.shape == (2, 1, 3) and points.dtype == torch.long
        assert labels.shape == (2, 1) and labels.tolist() == [[1], [1]]
        for b in range(2):
            assert gt[b][tuple(points[b, 0])]
    # RITM puts the first click near the centre of the ball (deeper than half the max distance).
    points, _ = next_click(pred[:1], gt[:1], rule="ritm")
    assert torch.dist(points[0, 0].float(), torch.tensor([8.0, 12.0, 15.0])) <= 2.5


def test_ritm_picks_the_larger_error_and_labels_it() -> None:
    gt = _ball((32, 32, 32), (16, 16, 16), 8)[None]
    fp_big = _ball((32, 32, 32), (16, 16, 16), 8)[None] | _ball((32, 32, 32), (5, 5, 5), 4)[None]
    points, labels = next_click(fp_big, gt, rule="ritm")
    assert labels.item() == 0 and not gt[0][tuple(points[0, 0])]
    assert torch.dist(points[0, 0].float(), torch.tensor([5.0, 5.0, 5.0])) <= 2.5
    fn_big = gt & ~_ball((32, 32, 32), (16, 16, 12), 5)[None]
    points, labels = next_click(fn_big, gt, rule="ritm")
    assert labels.item() == 1 and gt[0][tuple(points[0, 0])] and not fn_big[0][tuple(points[0, 0])]


def test_no_error_cases() -> None:
    gt = _ball((16, 16, 16), (8, 8, 8), 3)[None]
    points, labels = next_click(gt, gt, rule="ritm")
    assert points[0, 0].tolist() == [8, 8, 8] and labels.item() == 0
    points, labels = next_click(gt, gt, rule="random")
    assert gt[0][tuple(points[0, 0])] and labels.item() == 1


def test_random_rule_is_uniform_over_the_error_and_seeded() -> None:
    gt = _ball((20, 20, 20), (10, 10, 10), 6)[None].repeat(64, 1, 1, 1)
    pred = gt.clone()
    pred[:, :, :, :10] = False  # half the ball missed
    pred[:, 0, 0, 0] = True  # one false positive voxel
    gen = torch.Generator().manual_seed(5)
    points, labels = next_click(pred, gt, rule="random", generator=gen)
    error = (gt & ~pred) | (pred & ~gt)
    for b in range(64):
        p = tuple(points[b, 0])
        assert error[b][p] and labels[b, 0].item() == int(gt[b][p])
    again, _ = next_click(pred, gt, rule="random", generator=torch.Generator().manual_seed(5))
    assert torch.equal(points, again)
    assert len({tuple(p) for p in points[:, 0].tolist()}) > 30  # spread out, not one voxel


def test_bad_arguments_raise_user_errors() -> None:
    m = torch.zeros(1, 4, 4, 4, dtype=torch.bool)
    with pytest.raises(FastSAM3DError, match="rule"):
        next_click(m, m, rule="nearest")  # type: ignore[arg-type]
    with pytest.raises(FastSAM3DError, match="same shape"):
        next_click(m, m[:, :2], rule="random")
