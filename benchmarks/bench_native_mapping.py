"""Mapping a tile's low-res logits back to a 512 x 512 x 300 CT grid (0.7 x 0.7 x 1.0 mm).

    python benchmarks/bench_native_mapping.py [--repeats 7] [--threads 1]

The session needs only the mask (logits > 0): ``crop_mask_to_native`` interpolates just the
native sub-box the positive low-res voxels can reach; the baseline, in the same run, is
``crop_logits_to_native`` (every voxel of the tile, ~270 x 270 x 190) thresholded.
``ratio`` = baseline ms / this ms. Objects are cubes of positive low-res logits (of 32^3).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fastsam3d.transforms as tr
from fastsam3d.bench import time_ms


def main() -> None:
    """Time both mappings for small, organ-sized and whole-tile objects; print JSON lines."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    shape = (512, 512, 300)
    affine = np.diag([0.7, 0.7, 1.0, 1.0])
    affine[:3, 3] = -affine[:3, :3] @ (np.asarray(shape) / 2)
    grid = tr.CropGrid.around(np.zeros(3))
    cpu = torch.device("cpu")
    for edge in (10, 20, 32):  # low-res voxels: 60 mm, 120 mm, the whole 192 mm tile
        low = -torch.ones(1, 1, 32, 32, 32)
        a = (32 - edge) // 2
        low[..., a : a + edge, a : a + edge, a : a + edge] = 1.0
        base = time_ms(
            lambda low=low: tr.crop_logits_to_native(low, grid, affine, shape)[1] > 0,
            cpu, args.repeats, warmup=1,
        )["median_ms"]  # fmt: skip
        fast = time_ms(
            lambda low=low: tr.crop_mask_to_native(low, grid, affine, shape),
            cpu, args.repeats, warmup=1,
        )["median_ms"]  # fmt: skip
        row = {
            "kind": "native_mapping",
            "object_mm": edge * 6,
            "baseline_ms": round(base, 1),
            "mask_ms": round(fast, 1),
            "ratio": round(base / fast, 2),
            "threads": args.threads,
            "torch": torch.__version__,
        }
        print(json.dumps(row))


if __name__ == "__main__":
    main()
