"""``import fastsam3d.modeling`` (and the registry) pulls in torch only, no heavy front-end stacks."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("monai", "nibabel", "SimpleITK", "napari", "qtpy", "fastapi")


def test_modeling_import_is_light() -> None:
    code = (
        "import sys, fastsam3d.modeling, fastsam3d.registry, fastsam3d.checkpoint\n"
        f"print([m for m in {HEAVY!r} if m in sys.modules])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"
