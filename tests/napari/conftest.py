"""Fixtures for the napari plugin tests: a small random model, an oblique test volume, and the
widget in a real viewer (run under ``xvfb-run``; offscreen Qt cannot draw the 3D canvas)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from fastsam3d.checkpoint import save_safetensors
from fastsam3d.registry import build_model
from fastsam3d.session import Session
from napari_plugin._widget import CHECKPOINT

#: a small random FastSAM3D (fast on 2 CPU cores); tests compare against a Session of the same
#: model, not against anatomy
SMALL = {
    "embed_dim": 96,
    "depth": 4,
    "num_heads": 4,
    "out_chans": 96,
    "prompt_embed_dim": 96,
    "decoder_mlp_dim": 256,
    "iou_head_hidden_dim": 64,
}


@pytest.fixture(scope="session")
def small_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("fastsam3d_dilated", **SMALL)


@pytest.fixture(scope="session")
def small_checkpoint(small_model, tmp_path_factory) -> Path:
    """The small model as a checkpoint file: what a user picks in the widget when no default
    model is bundled (the injected session factory then builds the same model)."""
    return save_safetensors(small_model, tmp_path_factory.mktemp("model") / "small.safetensors")


@pytest.fixture
def choose_small_model(small_checkpoint):
    """Pick the small model's file in a widget's Model controls, as a user does."""

    def choose(widget) -> None:
        widget._model_combo.value = CHECKPOINT
        widget._checkpoint.value = small_checkpoint

    return choose


#: one model crop per click: tile growth is the session's business (tested there) and a random
#: model's masks touch every face, which would open the maximum number of tiles on each click
SESSION_OPTIONS = {"device": "cpu", "max_new_tiles": 0}


@pytest.fixture
def make_session(small_model):
    """A fresh Session of the small model, as the widget under test builds it."""
    return lambda: Session(small_model, **SESSION_OPTIONS)


@pytest.fixture
def session_factory(make_session):
    """The widget's session factory with the small model injected (model choice ignored)."""
    return lambda model, device, dtype: make_session()


def oblique_affine() -> np.ndarray:
    """Voxel -> RAS: anisotropic spacing, rotated 20 deg about S and 10 deg about R, shifted."""
    a, b = np.deg2rad(20), np.deg2rad(10)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    out = np.eye(4)
    out[:3, :3] = rz @ rx @ np.diag([1.2, 0.9, 2.5])
    out[:3, 3] = (-40.0, 25.0, 110.0)
    return out


@pytest.fixture
def oblique_nifti(tmp_path):
    """A 64 x 56 x 40 phantom (a bright ellipsoid in noise) with an oblique affine."""
    rng = np.random.default_rng(0)
    shape = (64, 56, 40)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
    inside = (((grid - (30, 28, 20)) / (14, 10, 8)) ** 2).sum(-1) <= 1
    data = (rng.normal(0, 20, shape) + 200 * inside).astype(np.float32)
    path = tmp_path / "phantom.nii.gz"
    nib.save(nib.Nifti1Image(data, oblique_affine()), path)
    return path
