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
    """An official checkpoint on the Hugging Face Hub: ``fastsam3d download NAME`` fetches and
    verifies it (or download :attr:`url` yourself), then ``--model PATH`` loads it."""

    name: str
    arch: str
    repo_id: str
    filename: str
    note: str
    sha256: str | None = None
    """Pinned sha256 of the file; None: the download is checked against the Hub's LFS sha256."""
    revision: str = "main"

    @property
    def url(self) -> str:
        """Where the file is on huggingface.co (for downloading by hand)."""
        return f"https://huggingface.co/{self.repo_id}/resolve/{self.revision}/{self.filename}"


KNOWN_CHECKPOINTS: tuple[KnownCheckpoint, ...] = (
    KnownCheckpoint(
        "sam_med3d_turbo",
        "sam_med3d",
        "blueyo0/SAM-Med3D",
        "sam_med3d_turbo.pth",
        "SAM-Med3D-turbo teacher (vit_b_ori); clicks only",
    ),
    # The file name is the one third-party instructions use (.../resolve/main/FastSAM3D.pth); it
    # has not been checked against the repository listing, nor whether the file is the combined
    # student (loads alone) or the encoder-only one (needs decoder_checkpoint=).
    KnownCheckpoint(
        "fastsam3d",
        "fastsam3d",
        "techlove/FastSAM3D",
        "FastSAM3D.pth",
        "FastSAM3D 6-layer student; clicks only; loads as fastsam3d or fastsam3d_sparse",
    ),
)
