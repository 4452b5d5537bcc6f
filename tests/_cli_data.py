"""Small real inputs for the command-line tests: a tiny model file and phantom volumes.

The model is a real ``fastsam3d_dilated`` network with small sizes and random weights (the CLI
tests check plumbing, files and exit codes, not accuracy); it is saved with
:func:`fastsam3d.checkpoint.save_safetensors` and passed with ``--model PATH`` as a user would.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

TINY = {
    "embed_dim": 48, "depth": 2, "num_heads": 2, "out_chans": 48, "prompt_embed_dim": 48,
    "decoder_mlp_dim": 128, "decoder_heads": 4,
}  # fmt: skip


def tiny_model(seed: int = 0) -> torch.nn.Module:
    from fastsam3d.registry import build_model

    torch.manual_seed(seed)
    return build_model("fastsam3d_dilated", **TINY)


def tiny_model_file(folder: Path) -> Path:
    from fastsam3d.checkpoint import save_safetensors

    return save_safetensors(tiny_model(), folder / "tiny.safetensors")


def write_phantom(
    folder: Path, name: str, seed: int = 0, label_folder: Path | None = None
) -> tuple[Path, Path]:
    """A phantom image ``folder/name.nii.gz`` and its labels ``label_folder/name.nii.gz``
    (default ``folder/labels``); the grid (40 x 40 x 32 at 1.5 x 1.5 x 2 mm) fits one crop."""
    from fastsam3d.sample_data import make_phantom

    volume, label = make_phantom(shape=(40, 40, 32), spacing=(1.5, 1.5, 2.0), seed=seed)
    label_folder = folder / "labels" if label_folder is None else label_folder
    label_folder.mkdir(parents=True, exist_ok=True)
    folder.mkdir(parents=True, exist_ok=True)
    image_path = folder / f"{name}.nii.gz"
    label_path = label_folder / f"{name}.nii.gz"
    nib.save(nib.Nifti1Image(volume.array.astype(np.float32), volume.affine), image_path)
    nib.save(nib.Nifti1Image(label.astype(np.uint8), volume.affine), label_path)
    return image_path, label_path


def run_cli(*args: str | Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``python -m fastsam3d ARGS`` (the real entry point) and capture its output."""
    return subprocess.run(
        [sys.executable, "-m", "fastsam3d", *map(str, args)],
        capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip
