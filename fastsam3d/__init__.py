"""FastSAM3D: click-based interactive 3D segmentation of medical volumes.

Public entry points (imported lazily so ``import fastsam3d`` stays light):

* :func:`fastsam3d.build_model` -- build an architecture and load a checkpoint.
* :class:`fastsam3d.Session` -- the interactive API every front end uses.
* :func:`fastsam3d.load_volume` / :func:`fastsam3d.save_mask` -- volume I/O with geometry.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "build_model": "fastsam3d.registry",
    "Session": "fastsam3d.session",
    "Edit": "fastsam3d.session",
    "Volume": "fastsam3d.io.read",
    "load_volume": "fastsam3d.io.read",
    "save_mask": "fastsam3d.io.write",
}

__all__ = ["__version__", *_LAZY]  # noqa: PLE0604 (the keys are strings)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fastsam3d' has no attribute {name!r}")
