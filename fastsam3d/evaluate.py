"""Simulated-click evaluation of a session against reference labels, beside a classical baseline.

Protocol (official FastSAM3D evaluation, SPEC §10), run per label on the *native* volume through
the :class:`~fastsam3d.session.Session` (so crops, tiles and write-back are those a user gets):

* click 1 and 2 follow the RITM rule (the middle of the largest error region), later clicks the
  uniform error-region rule (:mod:`fastsam3d.simulate`), drawn from the label's voxels and the
  session's current mask on the native grid; the previous prediction is fed back by the session
  (its low-res logits are the next mask prompt). Difference to the official code: the click rule
  sees the thresholded native mask, not the crop's logits > 0.5.
* CVPR 2025 protocol (models that take boxes): the label's bounding box first, then 5 clicks,
  each at the middle of the largest error region (RITM rule).
* After every step: Dice and normalised surface Dice (NSD) from MONAI
  (``compute_dice``, ``compute_surface_dice`` with the voxel spacing, tolerance in mm).

The **baseline** gets the very same clicks: SimpleITK ``ConfidenceConnected`` region growing
(multiplier 2.5, 3 iterations) seeded at the positive clicks, inside a window reaching 40 mm
beyond them (unbounded growth leaks through soft tissue: on the sample CT a 40 mm window
roughly triples its one-click Dice); then every grown voxel goes to its nearest click (in mm) and is
kept only if that click is positive (so negative clicks cut away the region around them); finally
only components touching a positive click remain. For the box protocol the seed before any
positive click is the box centre, which then also counts as a positive click when negative
clicks cut, and growth stays inside the box.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from fastsam3d.atomic import atomic_path, write_csv
from fastsam3d.errors import FastSAM3DError, OutputExistsError, VolumeError
from fastsam3d.geometry import spacing as voxel_spacing
from fastsam3d.simulate import next_click

if TYPE_CHECKING:
    from fastsam3d.io.read import Volume
    from fastsam3d.session import Session

DEFAULT_SEED = 2023  # the official evaluation seed
DEFAULT_TOLERANCE_MM = 2.0
BOX_CLICKS = 5  # CVPR 2025 protocol: a box, then 5 clicks
ROW_FIELDS = (
    "case", "label", "protocol", "method", "step", "clicks", "dice", "nsd", "seconds",
    "i", "j", "k", "positive",
)  # fmt: skip


@dataclass
class Row:
    """One measurement: a method's mask of one label after ``step`` prompts.

    ``step`` counts prompts (the box is step 1 of the box protocol); ``clicks`` counts clicks;
    ``i, j, k, positive`` describe the prompt of this step (-1 for a box).
    """

    case: str
    label: int
    protocol: str  # "clicks" or "box+clicks"
    method: str  # "model" or "baseline"
    step: int
    clicks: int
    dice: float
    nsd: float
    seconds: float
    i: int
    j: int
    k: int
    positive: bool


def _bbox(mask: np.ndarray, margin: int, shape: tuple[int, ...]) -> tuple[slice, ...]:
    nz = np.argwhere(mask)
    lo = np.maximum(nz.min(0) - margin, 0)
    hi = np.minimum(nz.max(0) + 1 + margin, shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def dice_nsd(
    pred: np.ndarray, gt: np.ndarray, spacing_mm: np.ndarray, tolerance_mm: float | None
) -> tuple[float, float]:
    """Dice and NSD (MONAI) of two bool masks on a grid with ``spacing_mm``; computed inside
    the bounding box of their union (plus a margin of the tolerance): the same values, faster.
    ``tolerance_mm`` None skips the NSD (NaN): Dice alone needs neither MONAI nor SciPy."""
    union = pred | gt
    if not union.any():
        return 1.0, 1.0
    if not pred.any() or not gt.any():
        return 0.0, 0.0
    margin = (
        0 if tolerance_mm is None else int(np.ceil(tolerance_mm / float(np.min(spacing_mm)))) + 2
    )
    box = _bbox(union, margin, pred.shape)
    pred, gt = pred[box], gt[box]
    dice = 2.0 * np.count_nonzero(pred & gt) / (np.count_nonzero(pred) + np.count_nonzero(gt))
    if tolerance_mm is None:
        return dice, float("nan")
    from monai.metrics import compute_surface_dice

    p = torch.from_numpy(np.ascontiguousarray(pred))[None, None].float()
    g = torch.from_numpy(np.ascontiguousarray(gt))[None, None].float()
    nsd = float(
        compute_surface_dice(
            p, g, [tolerance_mm], include_background=True, spacing=[float(s) for s in spacing_mm]
        )[0, 0]
    )
    return dice, nsd


def simulate_click(
    pred: np.ndarray, gt: np.ndarray, rule: str, generator: torch.Generator
) -> tuple[np.ndarray, bool]:
    """Next click (voxel index, positive) on the native grid by the SPEC §10 rule.

    The rule runs inside the bounding box of ``pred | gt`` plus one voxel (the volume border
    counts as outside anyway), which gives the same distances and is much faster.
    """
    box = _bbox(pred | gt, 1, pred.shape)
    p = torch.from_numpy(np.ascontiguousarray(pred[box]))[None]
    g = torch.from_numpy(np.ascontiguousarray(gt[box]))[None]
    points, labels = next_click(p, g, rule, generator)
    offset = np.array([s.start for s in box])
    return points[0, 0].numpy() + offset, bool(labels[0, 0])


class RegionGrowing:
    """The classical baseline on one volume (see the module docstring)."""

    def __init__(
        self,
        volume: Volume,
        multiplier: float = 2.5,
        iterations: int = 3,
        radius: int = 1,
        window_mm: float = 40.0,
    ):
        import SimpleITK as sitk

        self.spacing = voxel_spacing(volume.affine)
        # SimpleITK arrays are (k, j, i); transposing keeps ITK index == our (i, j, k).
        self.image = sitk.GetImageFromArray(np.ascontiguousarray(volume.array.transpose(2, 1, 0)))
        self.image.SetSpacing([float(s) for s in self.spacing])
        self.shape = volume.array.shape
        self.params = (multiplier, iterations, radius)
        self.window_mm = window_mm

    def segment(
        self,
        clicks: list[tuple[np.ndarray, bool]],
        box: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> np.ndarray:
        """Bool mask (I, J, K) from clicks (voxel index, positive) and an optional voxel box."""
        import SimpleITK as sitk
        from scipy import ndimage

        seeds = [tuple(int(v) for v in c) for c, pos in clicks if pos]
        anchors = list(clicks)  # the points that own voxels when negative clicks cut
        if box is not None and not seeds:
            centre = (np.asarray(box[0]) + np.asarray(box[1])) // 2
            seeds = [tuple(int(v) for v in centre)]
            anchors.append((centre, True))  # the box's seed keeps its surroundings
        if not seeds:
            return np.zeros(self.shape, bool)
        multiplier, iterations, radius = self.params
        if box is None:  # grow only within window_mm of the positive clicks
            reach = np.ceil(self.window_mm / self.spacing).astype(int)
            pts = np.asarray(seeds)
            box = (
                np.maximum(pts.min(0) - reach, 0),
                np.minimum(pts.max(0) + reach, np.asarray(self.shape) - 1),
            )
        lo, hi = np.asarray(box[0], int), np.asarray(box[1], int) + 1
        image = sitk.RegionOfInterest(self.image, [int(v) for v in hi - lo], [int(v) for v in lo])
        offset = lo
        local = [tuple(int(v) for v in np.asarray(s) - offset) for s in seeds]
        grown = sitk.ConfidenceConnected(
            image, seedList=local, numberOfIterations=iterations, multiplier=multiplier,
            initialNeighborhoodRadius=radius, replaceValue=1,
        )  # fmt: skip
        region = sitk.GetArrayFromImage(grown).transpose(2, 1, 0).astype(bool)
        if any(not pos for _, pos in clicks):
            # Each voxel follows its nearest click (in mm): negative clicks cut their surroundings.
            near = np.zeros(region.shape, np.int32)
            for n, (c, _) in enumerate(anchors, 1):
                idx = tuple(int(v) for v in np.asarray(c) - offset)
                if all(0 <= a < b for a, b in zip(idx, region.shape)):
                    near[idx] = n
            _, nearest = ndimage.distance_transform_edt(
                near == 0, sampling=self.spacing, return_indices=True
            )
            owner = near[tuple(nearest)]
            positive = np.array([False] + [bool(p) for _, p in anchors])
            region &= positive[owner]
        components, _ = ndimage.label(region)
        keep = {components[s] for s in local if all(0 <= a < b for a, b in zip(s, region.shape))}
        region = np.isin(components, [c for c in keep if c])
        out = np.zeros(self.shape, bool)
        out[tuple(slice(a, a + n) for a, n in zip(offset, region.shape))] = region
        return out


def _rule(step: int) -> str:
    """Official schedule: RITM for clicks 1-2, then uniform over the error region."""
    return "ritm" if step < 2 else "random"


def evaluate_case(
    session: Session,
    volume: Volume,
    label: np.ndarray,
    label_ids: Iterable[int] | None = None,
    n_clicks: int = 10,
    seed: int = DEFAULT_SEED,
    baseline: bool = True,
    box: bool | None = None,
    tolerance_mm: float | None = DEFAULT_TOLERANCE_MM,
    case: str = "",
) -> list[Row]:
    """Run the simulated-click protocol on one volume; returns one row per label, method, step.

    Args:
        session: a session with a model (its current volume is replaced).
        volume: the image.
        label: (I, J, K) integer reference labels on the volume's grid.
        label_ids: labels to evaluate (default: every label present); empty ones are skipped.
        n_clicks: clicks per label.
        seed: clicks are drawn from ``torch.Generator().manual_seed(seed)`` per label, so every
            label of every run gets the same clicks.
        baseline: also run the region-growing baseline on the same clicks.
        box: also run the box protocol; None = when the model accepts boxes.
        tolerance_mm: NSD tolerance (None: Dice only, NSD NaN).
        case: name written into the rows.
    """
    label = np.asarray(label)
    if label.shape != volume.array.shape:
        raise VolumeError(
            f"{case or 'labels'}: label shape {label.shape} does not match the image "
            f"{volume.array.shape}"
        )
    ids = (
        sorted(int(v) for v in np.unique(label) if v != 0) if label_ids is None else list(label_ids)
    )
    if box is None:
        box = session.predictor.accepts_boxes
    session.set_volume(volume)
    grower = RegionGrowing(volume) if baseline else None
    sp = voxel_spacing(volume.affine)
    rows: list[Row] = []
    for lid in ids:
        gt = label == lid
        if not gt.any():
            continue
        protocols = [("clicks", n_clicks)] + ([("box+clicks", BOX_CLICKS)] if box else [])
        for protocol, clicks in protocols:
            rows += _run_label(
                session, grower, gt, lid, protocol, clicks, seed, sp, tolerance_mm, case
            )
    return rows


def _run_label(
    session: Session, grower: RegionGrowing | None, gt: np.ndarray, lid: int, protocol: str,
    n_clicks: int, seed: int, sp: np.ndarray, tolerance_mm: float | None, case: str,
) -> list[Row]:  # fmt: skip
    session.clear()
    generator = torch.Generator().manual_seed(seed)
    rows: list[Row] = []
    clicks: list[tuple[np.ndarray, bool]] = []
    box = None
    step = 0

    def measure(seconds: float, point: np.ndarray, positive: bool) -> None:
        pred = session.label_map == session.active_object
        d, s = dice_nsd(pred, gt, sp, tolerance_mm)
        ijk = [int(v) for v in point]
        rows.append(
            Row(case, lid, protocol, "model", step, len(clicks), d, s, seconds, *ijk, positive)
        )
        if grower is not None:
            t0 = time.perf_counter()
            base = grower.segment(clicks, box)
            bs = time.perf_counter() - t0
            d, s = dice_nsd(base, gt, sp, tolerance_mm)
            rows.append(
                Row(case, lid, protocol, "baseline", step, len(clicks), d, s, bs, *ijk, positive)
            )

    if protocol == "box+clicks":
        nz = np.argwhere(gt)
        box = (nz.min(0), nz.max(0))
        step = 1
        edit = session.add_box(box[0], box[1], coords="voxel")
        measure(edit.seconds, np.full(3, -1), True)
    for n in range(n_clicks):
        pred = session.label_map == session.active_object
        rule = "ritm" if protocol == "box+clicks" else _rule(n)
        point, positive = simulate_click(pred, gt, rule, generator)
        clicks.append((point, positive))
        step += 1
        edit = session.add_point(point, positive, coords="voxel")
        measure(edit.seconds, point, positive)
    return rows


# --------------------------------------------------------------------------- reports
def pair_cases(images: str | Path, labels: str | Path) -> list[tuple[str, Path, Path]]:
    """(case, image, label) triples: two files, or two folders matched by case name."""
    from fastsam3d.batch import case_name, discover_cases

    images, labels = Path(images), Path(labels)
    if images.is_file() or labels.is_file():
        for p in (images, labels):
            if not p.exists():
                raise VolumeError(f"{p}: no such file or folder")
        return [(case_name(images), images, labels)]
    imgs, labs = discover_cases(images), discover_cases(labels)
    for name in imgs:
        if name not in labs:
            raise VolumeError(
                f"image case {name!r} ({imgs[name]}) has no label volume of that name in {labels}"
            )
    if not imgs:
        raise VolumeError(f"{images}: no volumes found")
    return [(name, imgs[name], labs[name]) for name in imgs]


def summarize(rows: list[Row], per_label: bool = False) -> list[dict]:
    """Mean Dice / NSD / seconds per protocol, method and step: over every case and label
    (``label`` "all"), plus, with ``per_label``, over the cases of each label."""
    groups: dict[tuple, list[Row]] = {}
    for r in rows:
        groups.setdefault(("all", r.protocol, r.method, r.step), []).append(r)
        if per_label:
            groups.setdefault((str(r.label), r.protocol, r.method, r.step), []).append(r)
    out = []
    for (label, protocol, method, step), rs in groups.items():
        out.append({
            "label": label, "protocol": protocol, "method": method, "step": step,
            "clicks": rs[0].clicks, "n": len(rs),
            "dice": float(np.mean([r.dice for r in rs])),
            "nsd": float(np.mean([r.nsd for r in rs])),
            "seconds": float(np.mean([r.seconds for r in rs])),
        })  # fmt: skip
    order = {"model": 0, "baseline": 1}
    return sorted(
        out,
        key=lambda s: (
            s["label"] != "all",
            s["label"].zfill(6),
            s["protocol"],
            order[s["method"]],
            s["step"],
        ),
    )


def plot(rows: list[Row], path: Path, title: str = "") -> Path:
    """PNG of mean Dice against the number of prompts, model beside baseline (atomic write)."""
    try:
        import matplotlib
    except ImportError:
        raise FastSAM3DError(
            "the Dice plot needs matplotlib: pip install 'fastsam3d[report]'"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    styles = {"model": "-o", "baseline": "--s"}
    for protocol in sorted({r.protocol for r in rows}):
        for method in ("model", "baseline"):
            pts = [
                s for s in summarize(rows) if s["protocol"] == protocol and s["method"] == method
            ]
            if pts:
                label = f"{method} ({protocol})"
                ax.plot(
                    [s["step"] for s in pts], [s["dice"] for s in pts], styles[method], label=label
                )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("prompts (clicks; box protocol: box = 1)")
    ax.set_ylabel("mean Dice")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title or "Dice vs clicks")
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp)
    plt.close(fig)
    return path


REPORT_FILES = ("results.csv", "summary.csv", "dice_vs_clicks.png")


def write_report(
    rows: list[Row], report_dir: str | Path, overwrite: bool = False, title: str = ""
) -> dict[str, Path]:
    """Write ``results.csv`` (every row), ``summary.csv`` (means over all labels and per label)
    and ``dice_vs_clicks.png``."""
    out = Path(report_dir)
    paths = {name: out / name for name in REPORT_FILES}
    if not overwrite:
        existing = [p for p in paths.values() if p.exists()]
        if existing:
            raise OutputExistsError(
                f"{existing[0]} already exists; pass --overwrite to replace the report"
            )
    if not rows:
        raise FastSAM3DError(
            "nothing to report: no label of the chosen ids is present in the labels"
        )
    out.mkdir(parents=True, exist_ok=True)
    write_csv(paths["results.csv"], [asdict(r) for r in rows], ROW_FIELDS)
    summary = summarize(rows, per_label=True)
    write_csv(paths["summary.csv"], summary, summary[0].keys())
    plot(rows, paths["dice_vs_clicks.png"], title)
    return paths
