"""A refinement click's native-grid work on the CPU: the mapping alone, then the whole session.

    python benchmarks/bench_native_mapping.py [--repeats 7] [--threads 1] [--case ct512 ...]

Mapping rows (``kind: native_mapping``): a tile's low-res logits onto a 512 x 512 x 300 CT grid
(0.7 x 0.7 x 1.0 mm). The session needs only the mask (logits > 0): ``paste_crop_mask`` maps
just the native rows the positive low-res voxels can reach, in cache-sized slabs thresholded
into the canvas; the baseline, in the same run, is ``crop_logits_to_native`` (every voxel of the
tile, ~270 x 270 x 190) thresholded. Objects are cubes of positive low-res logits (of 32^3).

Session rows (``kind: refine``, ``fastsam3d.bench.bench_refine``): refinement clicks through
the whole ``Session`` path with untrained weights on a 128^3 crop-sized volume and on a
512 x 512 x 300 CT at 0.8 x 0.8 x 1.0 mm, against ``ReferenceSession`` (the straightforward
stitching and label-map update) in the same run; ``--model ball`` gives local objects of ~1M
voxels (as a trained model's) instead of the untrained model's tile-filling masks.
``ratio`` = baseline ms / this ms.
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
from fastsam3d.bench import REFINE_CASES, bench_refine, time_ms


def main() -> None:
    """Time the mapping for small, organ-sized and whole-tile objects, then the session's
    refinement click; print JSON lines."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--case", action="append", choices=list(REFINE_CASES), help="session cases")
    ap.add_argument(
        "--model", action="append", help="session models: untrained (default), ball, a checkpoint"
    )
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="session models'")
    ap.add_argument("--device", default="cpu", help="session models' (cpu or cuda)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = (512, 512, 300)
    affine = np.diag([0.7, 0.7, 1.0, 1.0])
    affine[:3, 3] = -affine[:3, :3] @ (np.asarray(shape) / 2)
    grid = tr.CropGrid.around(np.zeros(3))
    lo, hi = tr.native_bbox(grid, affine, shape)
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
            lambda low=low: tr.paste_crop_mask(
                torch.zeros(tuple(hi - lo), dtype=torch.bool), lo, low, grid, affine, shape
            ),
            cpu, args.repeats, warmup=1,
        )["median_ms"]  # fmt: skip
        row = {
            "kind": "native_mapping",
            "object_mm": edge * 6,
            "baseline_ms": round(base, 1),
            "mask_ms": round(fast, 1),
            "ratio": round(base / fast, 2),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
        }
        print(json.dumps(row), flush=True)
    for model in args.model or ["untrained"]:
        for row in bench_refine(
            model, args.repeats, args.case or tuple(REFINE_CASES), args.dtype, args.device
        ):
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
