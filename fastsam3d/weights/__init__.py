"""Bundled default weights and the list of known checkpoints.

The default model (``default.safetensors`` beside this file, described in ``MODEL_CARD.md``) is
what ``Session("default")`` and every front end load when no model is named.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

WEIGHTS_DIR = Path(__file__).resolve().parent
DEFAULT_FILE = WEIGHTS_DIR / "default.safetensors"


def default_checkpoint() -> Path | None:
    """Path of the bundled default weights, or None when this installation has none."""
    return DEFAULT_FILE if DEFAULT_FILE.is_file() else None


@dataclass(frozen=True)
class KnownCheckpoint:
    """An official checkpoint users can fetch themselves and load with ``--model PATH``."""

    name: str
    arch: str
    source: str
    note: str


KNOWN_CHECKPOINTS: tuple[KnownCheckpoint, ...] = (
    KnownCheckpoint(
        "sam_med3d_turbo",
        "sam_med3d",
        "https://huggingface.co/blueyo0/SAM-Med3D (sam_med3d_turbo.pth)",
        "SAM-Med3D-turbo teacher (vit_b_ori); clicks only",
    ),
    KnownCheckpoint(
        "fastsam3d",
        "fastsam3d",
        "https://huggingface.co/techlove/FastSAM3D (combined student, as the Slicer module uses)",
        "FastSAM3D 6-layer student; clicks only; loads as fastsam3d or fastsam3d_sparse",
    ),
)
