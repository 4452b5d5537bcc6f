"""Model latency, throughput, memory and accuracy of the fast paths (torch + numpy only).

    python benchmarks/bench_model.py                       # CPU or GPU, whichever is there
    python benchmarks/bench_model.py --arch fastsam3d --arch fastsam3d_dilated --compile

Prints JSON lines (each fast path beside a same-run eager float32 baseline, as ratios) and a
table. ``--sparse`` adds dense vs dilated vs official-sparse encoders at 128^3, 192^3, 256^3.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a bare checkout too

from fastsam3d.bench import bench_sparse, profile_clicks, run_model_bench, table


def main() -> None:
    """Parse arguments, run, print JSON lines then the table (and save them with --out)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--arch", action="append", help="architecture(s) (default fastsam3d_dilated)")
    ap.add_argument("--checkpoint", help="weights file instead of random weights")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--repeats", type=int)
    ap.add_argument("--batch", action=argparse.BooleanOptionalAction, default=None)
    ap.add_argument("--compile", action="store_true", help="add torch.compile (slow to build)")
    ap.add_argument("--sparse", action="store_true", help="add the sparse-attention sizes")
    ap.add_argument("--profile", action="store_true", help="print kernel-time tables at the end")
    ap.add_argument("--out", type=Path, help="also write the JSON lines here")
    args = ap.parse_args()
    rows = run_model_bench(
        args.arch or ["fastsam3d_dilated"],
        args.device,
        args.repeats,
        args.batch,
        args.compile,
        args.checkpoint,
    )
    if args.sparse:
        for row in bench_sparse(args.device):
            print(json.dumps(row), flush=True)
            rows.append(row)
    if args.out:
        args.out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(table(rows))
    if args.profile:
        print(profile_clicks((args.arch or ["fastsam3d_dilated"])[0], args.device))


if __name__ == "__main__":
    main()
