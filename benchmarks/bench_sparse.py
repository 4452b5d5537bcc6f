"""Dense vs dilated (grid/block) vs official-sparse attention in the image encoder.

    python benchmarks/bench_sparse.py [--sizes 128 192 256] [--device cuda]

JSON lines then a table; ``ratio`` is the dense encoder's time over this one's, same run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastsam3d.bench import bench_sparse, table


def main() -> None:
    """Run the sparse-attention benchmark."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", type=int, nargs="+", default=[128, 192, 256])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--repeats", type=int)
    args = ap.parse_args()
    rows = bench_sparse(args.device, args.sizes, args.repeats)
    for row in rows:
        print(json.dumps(row))
    print(table(rows))


if __name__ == "__main__":
    main()
