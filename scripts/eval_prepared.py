"""The model card's 45-label evaluation (scripts/eval45.sh, without the baseline) of several
checkpoints on a prepared copy of the sample CT, for a machine without NIfTI readers: the device
image has neither nibabel nor MONAI, so the CT is read here and carried as arrays.

    python scripts/eval_prepared.py --save .device_carry/eval45.safetensors      # here
    python scripts/eval_prepared.py --case .device_carry/eval45.safetensors \\
        --out DIR --device cuda CKPT...                                          # there

Writes DIR/NAME/results.csv per checkpoint (the rows `fastsam3d evaluate` writes: compare two
with scripts/paired_eval.py) and prints one JSON line per checkpoint: mean Dice per protocol
and step over the 45 labels, the 23 selection labels (every second one, also in
val_select.safetensors) and the other 22.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from _labels import REPORT_LABELS

SEED = 2023  # the evaluation's click seed (scripts/eval45.sh)


def save(path: Path) -> None:
    """The sample CT and its labels as int16 / uint8 arrays with the image's affine."""
    from safetensors.torch import save_file

    from fastsam3d.cli.evaluate import _load_pair
    from fastsam3d.sample_data import sample_paths

    volume, label = _load_pair(*sample_paths())
    image = volume.array
    if not np.array_equal(image, np.rint(image)):
        raise SystemExit("the sample CT is not integral; store it as float32")
    tensors = {
        "image": torch.from_numpy(image.astype(np.int16)),
        "label": torch.from_numpy(label.astype(np.uint8)),
        "affine": torch.from_numpy(volume.affine),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")


def means(rows: list, labels: set[int]) -> dict[str, float]:
    """Mean model Dice per ``protocol/step`` over ``labels`` (``evaluate.summarize``'s rows)."""
    from fastsam3d.evaluate import summarize

    mine = summarize([r for r in rows if r.label in labels])
    return dict(sorted((f"{s['protocol']}/{s['step']}", round(s["dice"], 4)) for s in mine))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoints", nargs="*", type=Path)
    parser.add_argument("--save", type=Path, help="prepare the CT into this file and stop")
    parser.add_argument("--case", type=Path, default=Path(".device_carry/eval45.safetensors"))
    parser.add_argument("--out", type=Path, default=Path("eval_prepared"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--seed", type=lambda v: [int(x) for x in v.split(",")], default=[SEED],
        help="click seeds, e.g. 2023,7; with several, each label is evaluated once per seed "
        "(case sample_sSEED) and the means are over all of them",
    )  # fmt: skip
    parser.add_argument("--labels", help="label ids, e.g. 1,2 (default: the 45; a quick check)")
    args = parser.parse_args()
    if args.save:
        return save(args.save)
    from safetensors.torch import load_file

    from fastsam3d.atomic import write_csv
    from fastsam3d.evaluate import ROW_FIELDS, evaluate_case
    from fastsam3d.io.read import Volume
    from fastsam3d.session import Session

    arrays = load_file(str(args.case))
    volume = Volume(arrays["image"].float().numpy(), arrays["affine"].numpy(), "sample CT")
    label = arrays["label"].long().numpy()
    labels = [int(v) for v in args.labels.split(",")] if args.labels else REPORT_LABELS
    groups = {
        "all": set(REPORT_LABELS),
        "selection": set(REPORT_LABELS[::2]),
        "other": set(REPORT_LABELS[1::2]),
    }
    for ckpt in args.checkpoints:
        session = Session(model=str(ckpt), device=args.device)
        rows = [
            row
            for seed in args.seed
            for row in evaluate_case(
                session, volume, label, labels, n_clicks=5, seed=seed, baseline=False,
                tolerance_mm=None, case="sample" if len(args.seed) == 1 else f"sample_s{seed}",
            )
        ]  # fmt: skip
        name = (
            ckpt.stem
            if ckpt.parent.name != "snapshots"
            else f"{ckpt.parent.parent.name}_{ckpt.stem}"
        )
        (args.out / name).mkdir(parents=True, exist_ok=True)
        write_csv(args.out / name / "results.csv", [asdict(r) for r in rows], ROW_FIELDS)
        result = {"name": name, **{g: means(rows, ids) for g, ids in groups.items()}}
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    sys.exit(main())
