"""Synthetic training volumes generated on the GPU (torch, batched, seeded).

Each volume holds several structures painted over each other, largest first, so they touch,
nest and cut one another: deformed ellipsoids, lobed blobs and curved tubes, some much larger
than the crop (organ-like, cut by the border). Intensities are random per structure (some
neighbours nearly equal: low-contrast boundaries), with per-structure texture, a partial-volume
blur, a multiplicative bias field, Gaussian noise, a random gamma, sometimes dark "air" as
background and sometimes a zero slab at a face (what the crop looks like at a volume border).
One present structure is the target. The model thus has to learn "the object under the click"
from shape and local contrast, on any modality.

All randomness comes from one ``torch.Generator``: the same seed gives the same batch.
Throughput on an H100 is thousands of 128^3 volumes per minute (see MODEL_CARD.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from fastsam3d.transforms import MODEL_SPACING_MM


@dataclass(frozen=True)
class SyntheticConfig:
    """Knobs of the generator (voxel units of the generated cube)."""

    size: int = 128
    structures: int = 14  # slots per volume; each is present with probability ``presence``
    presence: float = 0.85
    tube_fraction: float = 0.15
    min_radius: float = 2.5
    max_radius: float = 80.0
    min_target_voxels: int = 300
    deform_voxels: float = 8.0  # max amplitude of the smooth coordinate deformation
    tube_samples: int = 12
    ct_fraction: float = 0.5  # share of volumes rendered with a CT-like dynamic range
    planes: float = 0.0  # share of volumes with thin background planes between touching structures


@dataclass
class SyntheticBatch:
    """image (B, 1, S, S, S) raw float32; target (B, 1, S, S, S) bool; labels (B, S, S, S) uint8
    (0 = background, k = structure k); target_id (B,) int64, the label value of the target."""

    image: Tensor
    target: Tensor
    labels: Tensor
    target_id: Tensor


def _uniform(shape: tuple[int, ...], lo: float, hi: float, gen: torch.Generator, device) -> Tensor:
    return lo + (hi - lo) * torch.rand(shape, generator=gen, device=device)


def _smooth_field(batch: int, channels: int, grid: int, size: int, gen, device) -> Tensor:
    """(B, C, S, S, S) smooth noise: a random grid^3 lattice upsampled trilinearly, std ~1."""
    coarse = torch.randn((batch, channels, grid, grid, grid), generator=gen, device=device)
    return F.interpolate(coarse, size=(size,) * 3, mode="trilinear", align_corners=True)


def _random_rotations(n: int, gen: torch.Generator, device) -> Tensor:
    """(n, 3, 3) uniformly random rotation matrices (from random unit quaternions)."""
    q = torch.randn((n, 4), generator=gen, device=device)
    q = q / q.norm(dim=1, keepdim=True)
    w, x, y, z = q.unbind(1)
    return torch.stack(
        [
            1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w),
            2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w),
            2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y),
        ],
        dim=1,
    ).view(n, 3, 3)  # fmt: skip


def _gaussian_blur(x: Tensor, sigma: Tensor) -> Tensor:
    """Separable Gaussian blur of (B, 1, S, S, S) with a per-sample sigma (B,) in voxels."""
    b = x.shape[0]
    radius = 3
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-0.5 * (t[None] / sigma[:, None].clamp_min(1e-3)) ** 2)
    k = k / k.sum(dim=1, keepdim=True)  # (B, 7)
    y = x.transpose(0, 1)  # (1, B, S, S, S): one group per sample
    for shape, pad in (
        ((b, 1, 7, 1, 1), (0, 0, 0, 0, radius, radius)),
        ((b, 1, 1, 7, 1), (0, 0, radius, radius, 0, 0)),
        ((b, 1, 1, 1, 7), (radius, radius, 0, 0, 0, 0)),
    ):
        y = F.conv3d(F.pad(y, pad, mode="replicate"), k.view(shape), groups=b)
    return y.transpose(0, 1)


def _structure_params(batch: int, cfg: SyntheticConfig, gen, device) -> dict[str, Tensor]:
    """Random parameters of every slot, sorted per volume from largest to smallest radius."""
    k, s = cfg.structures, cfg.size
    log_r = _uniform((batch, k), math.log(cfg.min_radius), math.log(cfg.max_radius), gen, device)
    is_tube = torch.rand((batch, k), generator=gen, device=device) < cfg.tube_fraction
    # Tubes are thin: radius 1.5..9 voxels, length of the order of the big structures.
    radius = torch.where(is_tube, _uniform((batch, k), 1.5, 9.0, gen, device), log_r.exp())
    order = radius.argsort(dim=1, descending=True)
    radius = radius.gather(1, order)
    is_tube = is_tube.gather(1, order)
    present = torch.rand((batch, k), generator=gen, device=device) < cfg.presence
    present[:, 0] = True
    # Centres: the first structure anywhere near the cube; later ones often next to an earlier one
    # (touching neighbours), else anywhere.
    centres = _uniform((batch, k, 3), -0.45 * s, 0.45 * s, gen, device)
    direction = torch.randn((batch, k, 3), generator=gen, device=device)
    direction = direction / direction.norm(dim=2, keepdim=True)
    near = torch.rand((batch, k), generator=gen, device=device) < 0.7
    for i in range(1, k):
        parent = (torch.rand((batch,), generator=gen, device=device) * i).long()
        pc = centres[torch.arange(batch, device=device), parent]
        pr = radius[torch.arange(batch, device=device), parent]
        dist = (pr + radius[:, i]) * _uniform((batch,), 0.3, 1.05, gen, device)
        candidate = pc + direction[:, i] * dist[:, None]
        centres[:, i] = torch.where(near[:, i, None], candidate, centres[:, i])
    return {
        "radius": radius,
        "is_tube": is_tube,
        "present": present,
        "centres": centres,
        "aniso": _uniform((batch, k, 3), 0.55, 1.6, gen, device),
        "rot": _random_rotations(batch * k, gen, device).view(batch, k, 3, 3),
        "lobe_amp": _uniform((batch, k, 3), 0.0, 0.22, gen, device)
        * (torch.rand((batch, k, 1), generator=gen, device=device) < 0.6),
        "lobe_freq": _uniform((batch, k, 3), 2.0, 6.0, gen, device),
        "lobe_phase": _uniform((batch, k, 3), 0.0, 2 * math.pi, gen, device),
        "lobe_dir": F.normalize(torch.randn((batch, k, 3, 3), generator=gen, device=device), dim=3),
        "tube_bend": torch.randn((batch, k, 3), generator=gen, device=device),
        "tube_len": _uniform((batch, k), 0.3 * s, 1.2 * s, gen, device),
    }


def _blob_field(x: Tensor, p: dict[str, Tensor], i: int) -> Tensor:
    """Implicit function (< 0 inside) of the lobed, anisotropic, rotated ellipsoid in slot i."""
    b = x.shape[0]
    rel = x - p["centres"][:, i].view(b, 1, 1, 1, 3)
    scale = (p["radius"][:, i, None] * p["aniso"][:, i]).view(b, 1, 1, 1, 3)
    local = torch.einsum("bdhwj,bjk->bdhwk", rel, p["rot"][:, i]) / scale
    r = local.norm(dim=-1)
    unit = local / r[..., None].clamp_min(1e-6)
    proj = torch.einsum("bdhwj,bmj->bdhwm", unit, p["lobe_dir"][:, i])
    lobes = torch.sin(
        proj * p["lobe_freq"][:, i].view(b, 1, 1, 1, 3) + p["lobe_phase"][:, i].view(b, 1, 1, 1, 3)
    )
    return r - 1.0 - (lobes * p["lobe_amp"][:, i].view(b, 1, 1, 1, 3)).sum(-1)


def _tube_field(x: Tensor, p: dict[str, Tensor], i: int, samples: int) -> Tensor:
    """Implicit function of a curved tube (quadratic Bezier centreline) in slot i."""
    b = x.shape[0]
    axis = p["rot"][:, i, :, 0]
    half = (p["tube_len"][:, i] / 2)[:, None]
    c = p["centres"][:, i]
    p0, p2 = c - axis * half, c + axis * half
    p1 = c + p["tube_bend"][:, i] * half * 0.6
    best = None
    for t in torch.linspace(0, 1, samples, device=x.device).tolist():
        point = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2
        d = (x - point.view(b, 1, 1, 1, 3)).square().sum(-1)
        best = d if best is None else torch.minimum(best, d)
    return best.sqrt() / p["radius"][:, i].view(b, 1, 1, 1) - 1.0


@torch.no_grad()
def generate(
    batch: int,
    generator: torch.Generator,
    config: SyntheticConfig = SyntheticConfig(),
) -> SyntheticBatch:
    """Generate ``batch`` synthetic volumes on the generator's device (see module docstring)."""
    cfg, device = config, generator.device
    s, k = cfg.size, cfg.structures
    axis = torch.arange(s, device=device, dtype=torch.float32) - (s - 1) / 2
    base = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1)  # (S, S, S, 3)
    gen = generator
    amp = _uniform((batch, 1, 1, 1, 1), 0.0, cfg.deform_voxels, gen, device)
    deform = _smooth_field(batch, 3, 5, s, gen, device) * amp
    x = base[None] + deform.permute(0, 2, 3, 4, 1)  # (B, S, S, S, 3)

    p = _structure_params(batch, cfg, gen, device)
    labels = torch.zeros((batch, s, s, s), dtype=torch.uint8, device=device)
    for i in range(k):
        tube = _tube_field(x, p, i, cfg.tube_samples) if p["is_tube"][:, i].any() else None
        blob = _blob_field(x, p, i) if not p["is_tube"][:, i].all() else None
        if tube is None:
            field = blob
        elif blob is None:
            field = tube
        else:
            field = torch.where(p["is_tube"][:, i].view(batch, 1, 1, 1), tube, blob)
        inside = (field < 0) & p["present"][:, i].view(batch, 1, 1, 1)
        labels = torch.where(inside, torch.full_like(labels, i + 1), labels)

    planes = _separating_planes(labels, cfg, gen) if cfg.planes > 0 else None
    if planes is not None:
        labels = labels.masked_fill(planes, 0)
    image = _render(labels, batch, cfg, gen, device, planes)
    # A zero slab at one face (crop beyond the volume: official zero padding; nothing labelled).
    slab = torch.rand((batch,), generator=gen, device=device) < 0.2
    depth = (_uniform((batch,), 0.05, 0.35, gen, device) * s).long()
    face = (torch.rand((batch,), generator=gen, device=device) * 6).long()
    idx = torch.arange(s, device=device)
    ax = [idx.view(1, s, 1, 1), idx.view(1, 1, s, 1), idx.view(1, 1, 1, s)]
    cut = torch.zeros((batch, s, s, s), dtype=torch.bool, device=device)
    for f in range(6):
        coord = ax[f // 2] if f % 2 == 0 else (s - 1 - ax[f // 2])
        sel = (slab & (face == f)).view(batch, 1, 1, 1)
        cut |= sel & (coord < depth.view(batch, 1, 1, 1))
    image = image.masked_fill(cut[:, None], 0.0)
    labels = labels.masked_fill(cut, 0)

    target_id = pick_targets(labels, k, cfg.min_target_voxels, gen)[:, 0]
    target = (labels == target_id.view(batch, 1, 1, 1).to(labels.dtype))[:, None]
    return SyntheticBatch(image=image, target=target, labels=labels, target_id=target_id)


def _separating_planes(labels: Tensor, cfg: SyntheticConfig, gen: torch.Generator) -> Tensor:
    """(B, S, S, S) bool: in a ``cfg.planes`` share of the volumes, a plane 2 or 4 voxels thick
    wherever two structures touch (the fat planes that separate organs in CT). The planes
    become background, so no target includes them."""
    b, s = labels.shape[0], labels.shape[-1]
    lab = labels.long()
    edge = torch.zeros(labels.shape, dtype=torch.bool, device=labels.device)
    for d in (1, 2, 3):
        hi, lo = lab.narrow(d, 1, s - 1), lab.narrow(d, 0, s - 1)
        touch = (hi != lo) & (hi > 0) & (lo > 0)
        edge.narrow(d, 1, s - 1).logical_or_(touch)
        edge.narrow(d, 0, s - 1).logical_or_(touch)
    wide = F.max_pool3d(edge[:, None].float(), 3, stride=1, padding=1)[:, 0] > 0
    thick = torch.rand((b, 1, 1, 1), generator=gen, device=labels.device) < 0.5
    use = torch.rand((b, 1, 1, 1), generator=gen, device=labels.device) < cfg.planes
    return torch.where(thick, wide, edge) & use


def _render(
    labels: Tensor, batch: int, cfg: SyntheticConfig, gen, device, planes: Tensor | None = None
) -> Tensor:
    """Intensities for a label map: contrast, texture, partial volume, bias, noise, gamma.

    Two intensity models, mixed per volume. *Generic*: each structure a random level in [0, 1]
    with offsets that put some of the volume at or below zero. *CT-like* (``ct_fraction``): an
    HU-shaped dynamic range in units of 1000 HU + 1, where most structures sit in a narrow
    soft-tissue band just above water, a few are bright (bone, contrast) or dark (fat, lung),
    the background is often air, and zero lies near water. After the official z-score over
    voxels > 0 this gives what real CT crops give: air at -10 to -20, organ-to-organ contrast
    of a few tenths, so the model must read small relative contrast, not absolute levels.
    ``planes`` (see :func:`_separating_planes`) get a level of their own: fat (0.85-0.95) in
    CT mode, a random level otherwise, without texture.
    """
    s, k = cfg.size, cfg.structures

    def rand(shape: tuple[int, ...]) -> Tensor:
        return torch.rand(shape, generator=gen, device=device)

    means = rand((batch, k + 1))
    # Low-contrast neighbours: some structures copy an earlier one's intensity, nearly.
    similar = rand((batch, k + 1)) < 0.3
    for i in range(1, k + 1):
        src = (rand((batch,)) * i).long()
        sign = torch.where(rand((batch,)) < 0.5, -1.0, 1.0)
        near = means[torch.arange(batch, device=device), src] + sign * _uniform(
            (batch,), 0.04, 0.12, gen, device
        )
        means[:, i] = torch.where(similar[:, i], near, means[:, i])
    air = rand((batch,)) < 0.3
    means[:, 0] = torch.where(air, torch.zeros_like(means[:, 0]), means[:, 0])

    ct = rand((batch, 1)) < cfg.ct_fraction
    band = _uniform((batch, 1), math.log(0.02), math.log(0.25), gen, device).exp()
    ct_means = 1.0 + band * means  # soft tissue: water + 0..band (the generic levels, squeezed)
    kind = rand((batch, k + 1))
    ct_means = torch.where(kind < 0.15, _uniform((batch, k + 1), 1.15, 2.5, gen, device), ct_means)
    ct_means = torch.where(
        (kind >= 0.15) & (kind < 0.25), _uniform((batch, k + 1), 0.05, 0.95, gen, device), ct_means
    )
    ct_air = rand((batch,)) < 0.7
    ct_means[:, 0] = torch.where(ct_air, torch.zeros_like(ct_means[:, 0]), ct_means[:, 0])
    means = torch.where(ct, ct_means, means)
    # Texture and noise are relative to the contrast range: the band's width in CT mode.
    rel = torch.where(ct, band * _uniform((batch, 1), 0.5, 3.0, gen, device), torch.ones_like(band))
    tex_amp = _uniform((batch, k + 1), 0.0, 0.12, gen, device) * rel
    lab = labels.long().view(batch, -1)
    mean_img = means.gather(1, lab).view(batch, 1, s, s, s)
    amp_img = tex_amp.gather(1, lab).view(batch, 1, s, s, s)
    if planes is not None:
        level = torch.where(
            ct, _uniform((batch, 1), 0.85, 0.95, gen, device), rand((batch, 1))
        ).view(batch, 1, 1, 1, 1)
        mean_img = torch.where(planes[:, None], level, mean_img)
        amp_img = amp_img.masked_fill(planes[:, None], 0.0)
    texture = _smooth_field(batch, 1, 16, s, gen, device) + 0.5 * _smooth_field(
        batch, 1, 48, s, gen, device
    )
    image = mean_img + amp_img * texture
    image = _gaussian_blur(image, _uniform((batch,), 0.3, 1.3, gen, device))
    rel5 = rel.view(batch, 1, 1, 1, 1)
    ct5 = ct.view(batch, 1, 1, 1, 1)
    bias = _smooth_field(batch, 1, 3, s, gen, device) * _uniform(
        (batch, 1, 1, 1, 1), 0, 0.3, gen, device
    )
    image = image * torch.where(ct5, 1.0 + bias * 0.1 * rel5, bias.exp())  # CT: no real bias field
    noise = _uniform((batch, 1, 1, 1, 1), 0.005, 0.05, gen, device) * rel5
    image = image + noise * torch.randn(image.shape, generator=gen, device=device)
    gamma = _uniform((batch, 1, 1, 1, 1), math.log(0.6), math.log(1.7), gen, device).exp()
    image = image.clamp_min(0).pow(torch.where(ct5, torch.ones_like(gamma), gamma))
    # Offsets push part of the volume to <= 0, which the z-score ignores (SPEC §9): a little of
    # the generic range, or (CT) zero near water so fat and air fall below it.
    shift = torch.where(
        ct5,
        -_uniform((batch, 1, 1, 1, 1), 0.6, 1.02, gen, device),
        _uniform((batch, 1, 1, 1, 1), -0.25, 0.05, gen, device),
    )
    scale = _uniform((batch, 1, 1, 1, 1), 0.5, 1000.0, gen, device)
    return (image + shift) * scale


def pick_targets(
    labels: Tensor, k: int, min_voxels: int, gen: torch.Generator, count: int = 1
) -> Tensor:
    """``count`` distinct random structures per volume with at least ``min_voxels`` voxels,
    (B, count) label values; where a volume has fewer, its first pick repeats (and with none,
    the largest structure stands in)."""
    batch = labels.shape[0]
    counts = torch.zeros((batch, k + 1), dtype=torch.long, device=labels.device)
    counts.scatter_add_(
        1, labels.long().view(batch, -1), torch.ones_like(labels.long().view(batch, -1))
    )
    counts[:, 0] = 0
    valid = counts >= min_voxels
    scores = torch.rand(counts.shape, generator=gen, device=labels.device).masked_fill(~valid, -1.0)
    top, picks = scores.topk(count, dim=1)
    first = torch.where(valid.any(dim=1), picks[:, 0], counts.argmax(dim=1))
    picks[:, 0] = first
    return torch.where(top >= 0, picks, first[:, None])


def validation_cases(
    n: int, seed: int = 1234, config: SyntheticConfig = SyntheticConfig()
) -> list[tuple[Any, np.ndarray, int]]:
    """Held-out synthetic cases for :func:`fastsam3d.evaluate.evaluate_case`.

    Returns ``n`` tuples (Volume at 1.5 mm isotropic, label map (S, S, S) uint8, target label id),
    generated on the CPU from ``seed`` (training runs use other seeds).
    """
    from fastsam3d.io.read import Volume

    batch = generate(n, torch.Generator().manual_seed(seed), config)
    affine = np.diag([MODEL_SPACING_MM] * 3 + [1.0])
    return [
        (
            Volume(batch.image[i, 0].numpy(), affine, None, {}),
            batch.labels[i].numpy(),
            int(batch.target_id[i]),
        )
        for i in range(n)
    ]
