"""Dice from a box alone, for boxes drawn as users draw them, with and without the box bound.

For each of the 45 reported labels of ts_abdomen_ct (scripts/report_labels.txt), a box from the
label's rectangle on its median slice along ``--axis``: ``flat`` (the rectangle itself, as
nnInteractive's front ends send it; ``Session.add_box`` makes it as deep as ``longer``),
``longer`` / ``shorter`` (as deep as the rectangle's longer side, napari's default, or its
shorter side, like Slicer's ROI), and the label's ``tight`` 3D bounding box (the evaluation's).
Prints the mean Dice with the bound (as shipped) and without (``Session`` with ``_box_bound``
off), paired by label. About 40 s on the 2-core CPU.

    python scripts/box_styles.py [--axis 2] [--styles tight,flat,longer,shorter]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from _labels import REPORT_LABELS

from fastsam3d.evaluate import dice_nsd
from fastsam3d.geometry import deepen_flat_box
from fastsam3d.geometry import spacing as voxel_spacing
from fastsam3d.io import load_volume
from fastsam3d.session import Session

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "ts_abdomen_ct"


class UnboundedSession(Session):
    """The session without the box bound (the behaviour before session 13)."""

    def _box_bound(self, obj):
        return None


def box(label: np.ndarray, style: str, axis: int, affine: np.ndarray):
    """(lo, hi) voxel corners of the label's box in ``style``."""
    where = np.argwhere(label)
    if style == "tight":
        return where.min(0), where.max(0)
    on_slice = where[where[:, axis] == int(np.median(where[:, axis]))]
    lo, hi = on_slice.min(0).astype(float), on_slice.max(0).astype(float)
    if style == "flat":
        return lo, hi
    plane = [a for a in range(3) if a != axis]
    sides = (hi - lo)[plane] * voxel_spacing(affine)[plane]
    depth = float(max(sides) if style == "longer" else min(sides))
    return deepen_flat_box(lo, hi, affine, label.shape, depth)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--axis", type=int, default=2, help="the slice axis of the rectangles")
    parser.add_argument("--styles", default="tight,flat,longer,shorter")
    args = parser.parse_args()
    volume = load_volume(DATA / "image.nii.gz")
    labels = np.asarray(load_volume(DATA / "label.nii.gz").array).round().astype(int)
    ids = REPORT_LABELS
    step = voxel_spacing(volume.affine)
    sessions = {"bound": Session("default", device="cpu")}
    sessions["no bound"] = UnboundedSession(sessions["bound"].predictor)
    for s in sessions.values():
        s.set_volume(volume)
    for style in args.styles.split(","):
        dice = {name: [] for name in sessions}
        inside = []
        for value in ids:
            gt = labels == value
            lo, hi = box(gt, style, args.axis, volume.affine)
            used = deepen_flat_box(lo, hi, volume.affine, gt.shape)  # as add_box takes it
            held = gt[tuple(slice(int(np.ceil(a)), int(np.floor(b)) + 1) for a, b in zip(*used))]
            inside.append(held.sum() / gt.sum())
            for name, s in sessions.items():
                s.clear()
                s.add_box(lo, hi)
                dice[name].append(dice_nsd(s.mask(1), gt, step, 2.0)[0])
        d = np.array(dice["bound"]) - np.array(dice["no bound"])
        print(
            f"{style:8s} axis {args.axis}: bound {np.mean(dice['bound']):.3f}, no bound "
            f"{np.mean(dice['no bound']):.3f}, bound - no bound {d.mean():+.3f} ± "
            f"{d.std(ddof=1) / np.sqrt(len(d)):.3f} (better {(d > 1e-3).sum()}, worse "
            f"{(d < -1e-3).sum()}); label inside the box {np.mean(inside):.0%}"
        )


if __name__ == "__main__":
    main()
