"""Model-space pipeline: crop sampling, official normalisation, mapping logits back."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastsam3d.transforms import (
    CropGrid,
    crop_logits_to_native,
    native_mask_to_crop_logits,
    normalize_crop,
    sample_crop,
    upsample_logits,
)

REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "reference"


def _oblique_affine(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    aff = np.eye(4)
    aff[:3, :3] = q @ np.diag(rng.uniform(0.7, 3.0, size=3))
    aff[:3, 3] = rng.uniform(-50, 50, size=3)
    return aff


@pytest.fixture
def preprocess_io():
    path = REFERENCE / "preprocess_io.npz"
    if not path.exists():
        if os.environ.get("CI"):
            pytest.fail(f"reference fixtures missing: {path}")
        pytest.skip(f"reference fixtures not found at {path}")
    return np.load(path)


def test_crop_and_normalisation_match_official_torchio(preprocess_io):
    """torchio CropOrPad (label-centred, zero pad) + ZNormalization(x > 0), SPEC §9."""
    raw = torch.from_numpy(preprocess_io["raw"].astype(np.float32))
    # The crop torchio chose (preprocess.json): pad 4 / crop 4 / pad 10 voxels at the start.
    grid = CropGrid(origin=(-4.0, 4.0, -10.0), spacing=1.0, size=32)
    crop = sample_crop(raw, np.eye(4), grid)
    np.testing.assert_array_equal(crop[0, 0].numpy(), preprocess_io["cropped_raw"])
    np.testing.assert_allclose(
        normalize_crop(crop)[0, 0].numpy(), preprocess_io["normalized"], atol=1e-5
    )


def test_normalize_crop_is_batched():
    x = torch.rand(3, 1, 8, 8, 8) * torch.tensor([1.0, 10.0, 100.0]).view(3, 1, 1, 1, 1)
    out = normalize_crop(x)
    for b in range(3):
        np.testing.assert_allclose(
            out[b].numpy(), normalize_crop(x[b : b + 1])[0].numpy(), rtol=1e-5
        )
        fg = x[b] > 0
        assert abs(float(out[b][fg].mean())) < 1e-4


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sample_crop_is_exact_on_linear_fields(seed):
    """Trilinear interpolation reproduces a linear function of world position exactly."""
    aff = _oblique_affine(seed)
    shape = (40, 36, 30)
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 3)
    ras = (aff @ np.c_[ijk, np.ones(len(ijk))].T).T[:, :3]
    w = np.array([0.3, -0.2, 0.5])
    vol = torch.from_numpy((ras @ w + 100).reshape(shape).astype(np.float32))
    center = (aff @ np.array([20, 18, 15, 1.0]))[:3]
    grid = CropGrid.around(center, spacing=2.0, size=16)
    crop = sample_crop(vol, aff, grid)[0, 0].numpy()
    abc = np.stack(np.meshgrid(*[np.arange(16)] * 3, indexing="ij"), -1)
    expected = grid.crop_to_ras(abc) @ w + 100
    # compare only crop voxels well inside the volume
    vox = (np.linalg.inv(aff) @ np.c_[grid.crop_to_ras(abc.reshape(-1, 3)), np.ones(16**3)].T).T[
        :, :3
    ]
    inside = np.all((vox >= 0) & (vox <= np.array(shape) - 1), axis=1).reshape(16, 16, 16)
    assert inside.sum() > 1000
    np.testing.assert_allclose(crop[inside], expected[inside], atol=1e-3)
    # outside the volume the crop is exactly zero (official zero padding)
    far = ~np.all((vox > -1) & (vox < np.array(shape)), axis=1).reshape(16, 16, 16)
    assert np.all(crop[far] == 0)


def test_logits_round_trip_to_native_grid():
    """A sphere drawn in crop space lands on the right native voxels (oblique, anisotropic)."""
    aff = _oblique_affine(5)
    shape = (60, 50, 40)
    center = (aff @ np.array([30, 25, 20, 1.0]))[:3]
    grid = CropGrid.around(center, spacing=1.5, size=32)
    abc = np.stack(np.meshgrid(*[np.arange(32)] * 3, indexing="ij"), -1)
    radius_mm = 12.0
    dist = np.linalg.norm(grid.crop_to_ras(abc) - center, axis=-1)
    logits = torch.from_numpy((radius_mm - dist).astype(np.float32))[None, None]
    bbox, values, inside = crop_logits_to_native(logits, grid, aff, shape)
    ijk = np.stack(np.meshgrid(*[np.arange(s.start, s.stop) for s in bbox], indexing="ij"), -1)
    ras = (aff[:3, :3] @ ijk.reshape(-1, 3).T).T + aff[:3, 3]
    truth = (np.linalg.norm(ras - center, axis=1) < radius_mm).reshape(values.shape)
    got = (values > 0).numpy() & inside.numpy()
    assert got.sum() > 100
    assert (got != truth).mean() < 0.01


def test_native_mask_to_crop_logits_sign():
    aff = np.diag([1.5, 1.5, 1.5, 1.0])
    mask = torch.zeros(64, 64, 64, dtype=torch.bool)
    mask[:32] = True
    grid = CropGrid(origin=(0.0, 0.0, 0.0), size=64)
    low = native_mask_to_crop_logits(mask, aff, grid, low_res=16)
    assert low.shape == (1, 1, 16, 16, 16)
    assert torch.all(low[0, 0, :7] > 0) and torch.all(low[0, 0, 9:] < 0)


@pytest.mark.parametrize(("shape", "size"), [((2, 3, 32, 32, 32), 128), ((1, 1, 16, 16, 16), 40)])
def test_upsample_logits_is_trilinear_interpolation(shape, size):
    """The separable matrix products equal F.interpolate, values and gradients, also when the
    1D matrix was first made under inference mode (the training loss backpropagates through it)."""
    x = torch.randn(shape)
    with torch.inference_mode():
        upsample_logits(torch.randn(shape), size)
    x.requires_grad_()
    got = upsample_logits(x, size)
    want = F.interpolate(x, size=(size,) * 3, mode="trilinear", align_corners=False)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    weights = torch.randn_like(want)
    (g_got,) = torch.autograd.grad((got * weights).sum(), x)
    (g_want,) = torch.autograd.grad((want * weights).sum(), x)
    torch.testing.assert_close(g_got, g_want, atol=1e-4, rtol=1e-4)


def test_upsample_logits_keeps_float32_under_autocast():
    """The training loss runs under bf16 autocast; the upsampled logits stay float32 there, as
    F.interpolate kept them."""
    x = torch.randn(1, 2, 32, 32, 32)
    with torch.autocast("cpu", torch.bfloat16):
        got = upsample_logits(x)
    assert got.dtype == torch.float32
    want = F.interpolate(x, size=(128,) * 3, mode="trilinear", align_corners=False)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_upsample_logits_compiles_under_inference_mode():
    """The CUDA graph modes compile the upsampling into the click (``Predictor.predict_mask``);
    tracing into the cached interpolation matrix failed a dynamo guard there (torch 2.11-2.13)."""
    x = torch.randn(1, 1, 8, 8, 8)
    with torch.inference_mode():
        fn = torch.compile(lambda t: upsample_logits(t, 32) > 0, dynamic=False)
        for t in (x, -x):
            assert torch.equal(fn(t), upsample_logits(t, 32) > 0)
