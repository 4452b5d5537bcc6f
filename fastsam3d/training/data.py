"""Real training data: labelled NIfTI volumes -> augmented 128^3 model crops around one object.

Two steps, so the GPU machine needs neither MONAI nor nibabel:

1. :func:`prepare_cases` (CPU, MONAI ``LoadImage``): read image/label pairs from a folder, keep
   the native grid and RAS affine (no resampling yet), clamp CT to [-1000, 1000] HU as SAM-Med3D
   training does, list every label value as an object, skip objects smaller than
   ``min_voxels`` at the model's 1.5 mm, and store a sample of each object's voxels (first-click
   positions). :func:`save_cases` / :func:`load_cases` keep the result as one safetensors file.
2. :class:`RealCropSampler` (torch, any device): picks an object, a click voxel inside it and a
   random rotation/scale about that voxel, then samples image and object mask onto a crop grid
   centred near the click with the inference pipeline's own resampler
   (:func:`fastsam3d.transforms.sample_crop`: 1.5 mm, RAS-aligned, zero outside the volume),
   so training crops are built exactly like the crops a :class:`fastsam3d.Session` feeds the
   model. Random flips follow the official ``RandomFlip(axes=(0, 1, 2))``. Normalisation
   (:func:`fastsam3d.transforms.normalize_crop`) and intensity augmentation happen in the loop,
   batched.

Folder layouts accepted: ``DIR/<case>/image.nii.gz`` + ``label.nii.gz`` (this project's data), or
``DIR/imagesTr/<name>(_0000).nii.gz`` + ``DIR/labelsTr/<name>.nii.gz`` (nnU-Net / MSD).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from fastsam3d.atomic import atomic_path
from fastsam3d.errors import FastSAM3DError
from fastsam3d.transforms import CROP_SIZE, MODEL_SPACING_MM, CropGrid, sample_crop

CT_CLAMP = (-1000.0, 1000.0)
_CLICK_SAMPLES = 4096  # stored candidate first-click voxels per object


@dataclass
class Case:
    """One labelled volume on its native grid.

    image (I, J, K) float32; label (I, J, K) uint8; affine (4, 4) voxel -> RAS mm;
    objects: label value -> (n, 3) int64 native voxels inside it (first-click candidates).
    """

    name: str
    image: Tensor
    label: Tensor
    affine: np.ndarray
    objects: dict[int, Tensor]

    def to(self, device: torch.device | str) -> Case:
        return Case(
            self.name,
            self.image.to(device),
            self.label.to(device),
            self.affine,
            {k: v.to(device) for k, v in self.objects.items()},
        )


def find_pairs(folder: str | Path) -> list[tuple[str, Path, Path]]:
    """(case name, image path, label path) of every labelled volume under ``folder``."""
    root = Path(folder)
    if not root.is_dir():
        raise FastSAM3DError(f"{root}: not a folder of labelled volumes")
    pairs = []
    if (root / "imagesTr").is_dir() and (root / "labelsTr").is_dir():
        for label in sorted((root / "labelsTr").glob("*.nii*")):
            stem = label.name.split(".nii")[0]
            images = sorted((root / "imagesTr").glob(f"{stem}*.nii*"))
            if images:
                pairs.append((stem, images[0], label))
    candidates = [root] + sorted(p for p in root.iterdir() if p.is_dir())
    for case in candidates:
        image, label = _nifti(case, "image"), _nifti(case, "label")
        if image is not None and label is not None:
            pairs.append((case.name, image, label))
    if not pairs:
        raise FastSAM3DError(
            f"{root}: no image/label pairs found (expected <case>/image.nii.gz + label.nii.gz, "
            "or imagesTr/ + labelsTr/)"
        )
    return pairs


def _nifti(folder: Path, stem: str) -> Path | None:
    for suffix in (".nii.gz", ".nii"):
        if (folder / f"{stem}{suffix}").is_file():
            return folder / f"{stem}{suffix}"
    return None


def load_case(name: str, image_path: Path, label_path: Path, min_voxels: int = 64) -> Case:
    """Read one pair with MONAI (RAS affine) and index its objects (see module docstring)."""
    from monai.transforms import LoadImage

    loader = LoadImage(image_only=True, dtype=np.float32)
    image = loader(str(image_path))
    label = loader(str(label_path))
    if image.shape != label.shape or image.ndim != 3:
        raise FastSAM3DError(
            f"{image_path}: image {tuple(image.shape)} and label {tuple(label.shape)} must be "
            "3D volumes on the same grid"
        )
    affine = np.asarray(image.affine, dtype=np.float64)
    arr = torch.as_tensor(np.asarray(image), dtype=torch.float32)
    if float(arr.min()) < -500:  # CT in HU (air at -1000): clamp as SAM-Med3D training does
        arr = arr.clamp(*CT_CLAMP)
    lab = torch.as_tensor(np.asarray(label)).round().to(torch.uint8)
    voxel_mm3 = abs(float(np.linalg.det(affine[:3, :3])))
    per_model_voxel = voxel_mm3 / MODEL_SPACING_MM**3
    gen = torch.Generator().manual_seed(0)
    objects = {}
    for value in torch.unique(lab).tolist():
        if value == 0:
            continue
        idx = (lab == value).nonzero()
        if idx.shape[0] * per_model_voxel < min_voxels:
            continue
        keep = torch.randperm(idx.shape[0], generator=gen)[:_CLICK_SAMPLES]
        objects[int(value)] = idx[keep.sort().values]
    return Case(name, arr, lab, affine, objects)


def prepare_cases(folders: list[str | Path], min_voxels: int = 64) -> list[Case]:
    """Load every labelled volume of ``folders``; cases with no usable object are dropped."""
    cases = [load_case(*pair, min_voxels=min_voxels) for f in folders for pair in find_pairs(f)]
    cases = [c for c in cases if c.objects]
    if not cases:
        raise FastSAM3DError(f"no object of at least {min_voxels} voxels at 1.5 mm in {folders}")
    return cases


def save_cases(cases: list[Case], path: str | Path) -> Path:
    """Store prepared cases as one safetensors file (image as float16), written atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors, meta = {}, []
    for i, c in enumerate(cases):
        tensors[f"{i}.image"] = c.image.half().contiguous()
        tensors[f"{i}.label"] = c.label.contiguous()
        tensors[f"{i}.affine"] = torch.as_tensor(c.affine)
        for value, idx in c.objects.items():
            tensors[f"{i}.obj{value}"] = idx.to(torch.int32).contiguous()
        meta.append({"name": c.name, "objects": sorted(c.objects)})
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"cases": json.dumps(meta)})
    return path


def load_cases(path: str | Path, device: torch.device | str = "cpu") -> list[Case]:
    """Inverse of :func:`save_cases`; a missing or foreign file raises FastSAM3DError."""
    from safetensors import SafetensorError

    path = Path(path)
    if not path.is_file():
        raise FastSAM3DError(
            f"{path}: no such prepared-cases file (make one with `fastsam3d train --data DIR "
            f"--save-cases {path.name} --steps 0 --out RUN`)"
        )
    try:
        return _read_cases(path, device)
    except (SafetensorError, KeyError, TypeError, ValueError) as err:
        why = "it has no case index" if isinstance(err, KeyError) else str(err)
        raise FastSAM3DError(
            f"{path}: not a prepared-cases file from `fastsam3d train --save-cases` ({why})"
        ) from None


def _read_cases(path: Path, device: torch.device | str) -> list[Case]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {})["cases"])
        cases = []
        for i, m in enumerate(meta):
            objects = {v: f.get_tensor(f"{i}.obj{v}").long() for v in m["objects"]}
            case = Case(
                m["name"],
                f.get_tensor(f"{i}.image").float(),
                f.get_tensor(f"{i}.label"),
                f.get_tensor(f"{i}.affine").numpy(),
                objects,
            )
            cases.append(case.to(device))
    return cases


#: default range of the random zoom of real crops about their click (``RealCropSampler``)
REAL_ZOOM = (0.85, 1.15)


def _augment_affine(
    affine: np.ndarray,
    pivot: np.ndarray,
    rng: np.random.Generator,
    scale: tuple[float, float] = REAL_ZOOM,
) -> np.ndarray:
    """``affine`` composed with a random rotation (<= 15 deg per axis) and a zoom uniform in
    ``scale`` about the RAS point ``pivot``: the volume is sampled as if rotated/scaled about
    the click (zoom s shows the anatomy s times larger, as a crop spacing of 1/s would)."""
    angles = rng.uniform(-math.pi / 12, math.pi / 12, size=3)
    rot = np.eye(3)
    for axis, a in enumerate(angles):
        c, s = math.cos(a), math.sin(a)
        i, j = [k for k in range(3) if k != axis]
        r = np.eye(3)
        r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
        rot = rot @ r
    lin = rot * rng.uniform(*scale)
    aug = np.eye(4)
    aug[:3, :3] = lin
    aug[:3, 3] = pivot - lin @ pivot
    return aug @ affine


class RealCropSampler:
    """Random augmented crops of real objects (see module docstring)."""

    def __init__(
        self,
        cases: list[Case],
        seed: int = 0,
        size: int = CROP_SIZE,
        spacing: float = MODEL_SPACING_MM,
        scale: tuple[float, float] = REAL_ZOOM,
    ) -> None:
        if not cases:
            raise FastSAM3DError("RealCropSampler needs at least one case with objects")
        self.cases = cases
        self.size = size
        self.spacing = spacing  # mm per crop voxel: the model's crop_spacing_mm
        self.scale = scale  # range of the zoom about the click (_augment_affine)
        self.index = [(ci, v) for ci, c in enumerate(cases) for v in c.objects]
        self.rng = np.random.default_rng(seed)

    def sample(self, n: int) -> tuple[Tensor, Tensor, Tensor]:
        """n crops on the cases' device.

        Returns:
            image (n, 1, S, S, S) raw intensities (zero outside the volume), target
            (n, 1, S, S, S) bool, first click (n, 3) int64 crop voxel inside the object
            (near the crop centre, as a Session places crops around the first click).
        """
        images, targets, clicks = [], [], []
        for _ in range(n):
            ci, value = self.index[self.rng.integers(len(self.index))]
            case = self.cases[ci]
            cand = case.objects[value]
            voxel = cand[self.rng.integers(cand.shape[0])].cpu().numpy().astype(np.float64)
            ras = (case.affine @ np.append(voxel, 1.0))[:3]
            affine = _augment_affine(case.affine, ras, self.rng, self.scale)
            centre = ras + self.rng.uniform(-6.0, 6.0, size=3)  # the Session snaps crop origins
            grid = CropGrid.around(centre, self.spacing, size=self.size)
            image = sample_crop(case.image, affine, grid)
            target = sample_crop(case.label == value, affine, grid) > 0.5
            click = torch.as_tensor(np.round(grid.ras_to_crop(ras)), dtype=torch.long)
            for axis in range(3):
                if self.rng.random() < 0.5:
                    image, target = image.flip(2 + axis), target.flip(2 + axis)
                    click[axis] = self.size - 1 - click[axis]
            images.append(image)
            targets.append(target)
            clicks.append(click.clamp(0, self.size - 1))
        device = self.cases[0].image.device
        return torch.cat(images), torch.cat(targets), torch.stack(clicks).to(device)
