"""Two runs of scripts/eval45.sh compared label by label (the model card's paired tables).

    python scripts/paired_eval.py runs/eval_A runs/eval_B

A run evaluated on several click seeds (``eval_prepared.py --seed 2023,7``) counts each label
once, with its Dice averaged over the seeds.

For each protocol and step: mean Dice of A and of B, then A - B as mean ± standard error with
(labels better / worse), over all 45 labels, over the 23 selection labels (every second one of
scripts/report_labels.txt: the ones `--val-cases .device_carry/val_select.safetensors` picks
checkpoints on) and over the other 22; after the first and last prompt also by kind of label.
"""

from __future__ import annotations

import csv
import math
import sys
from collections import defaultdict
from pathlib import Path

from _labels import REPORT_LABELS

SELECTION = set(REPORT_LABELS[::2])
GROUPS = {
    "organs": {1, 2, 3, 4, 5, 6, 7, 11, 14, 18, 19, 20, 21, 22},
    "vessels": {52, 63, 64, 65, 66, 67, 68},
    "bones": {25, 26, 27, 28, 29, 30, 31, 32, 75, 76, 77, 78, 117},
    "muscles": set(range(79, 90)),
}


def load(run: str) -> dict[tuple[str, int, int], float]:
    """The model's Dice per (protocol, step, label) from a run's results.csv, averaged over its
    cases (the click seeds of ``eval_prepared.py --seed A,B``), so labels stay the paired unit."""
    values: dict[tuple[str, int, int], list[float]] = defaultdict(list)
    with open(Path(run) / "results.csv") as f:
        for r in csv.DictReader(f):
            if r["method"] == "model":
                values[r["protocol"], int(r["step"]), int(r["label"])].append(float(r["dice"]))
    return {k: sum(v) / len(v) for k, v in values.items()}


def paired(a: dict, b: dict, keys: list) -> str:
    """``mean ± s.e. (better/worse)`` of a - b over ``keys``."""
    d = [a[k] - b[k] for k in keys]
    n = len(d)
    if not n:
        return "-"
    m = sum(d) / n
    se = math.sqrt(sum((x - m) ** 2 for x in d) / (n - 1) / n) if n > 1 else 0.0
    return f"{m:+.3f}±{se:.3f} ({sum(x > 0 for x in d)}/{sum(x < 0 for x in d)})"


def main() -> None:
    a, b = load(sys.argv[1]), load(sys.argv[2])
    for proto, steps in (("clicks", range(1, 6)), ("box+clicks", range(1, 7))):
        for s in steps:
            keys = [
                (proto, s, label) for label in REPORT_LABELS if (proto, s, label) in a.keys() & b
            ]
            if not keys:
                continue
            mean_a = sum(a[k] for k in keys) / len(keys)
            mean_b = sum(b[k] for k in keys) / len(keys)
            sel = [k for k in keys if k[2] in SELECTION]
            other = [k for k in keys if k[2] not in SELECTION]
            line = (
                f"{proto:10s} {s}: {mean_a:.3f} vs {mean_b:.3f} all {paired(a, b, keys)} "
                f"| sel {paired(a, b, sel)} | other {paired(a, b, other)}"
            )
            if s in (steps.start, steps.stop - 1):
                line += " | " + " ".join(
                    f"{g} {paired(a, b, [k for k in keys if k[2] in ids])}"
                    for g, ids in GROUPS.items()
                )
            print(line)


if __name__ == "__main__":
    main()
