"""How a multimask fine-tune's 4 outputs answer one click, and how well each rule picks among them.

For each of the 45 reported labels of ts_abdomen_ct (scripts/report_labels.txt): a 128^3 crop
centred on the object (as the crop validator builds it), the first click of the evaluation's rule
(``ritm``: the centre of the object, seed 2023), all 4 outputs decoded; crop-level Dice of each
output and of the output each rule picks: the IoU head over all 4 (what a `Session` does for a
``first_click_multimask`` model), the IoU head over the 3 multimask outputs (SAM's own rule),
SAM's stability score (IoU of the masks at logits > 1 and > -1) and the oracle (best of 4).
Means over all 45 labels, the 23 of the selection set and the 22 others.

    python scripts/multimask_outputs.py CHECKPOINT... [--copied-default]

``--copied-default`` adds the bundled default with its single output copied to the multimask ones
(``finetune --multimask``'s start).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from _labels import REPORT_LABELS

from fastsam3d.checkpoint import load_model
from fastsam3d.registry import build_model
from fastsam3d.simulate import next_click
from fastsam3d.training.data import load_case
from fastsam3d.training.loop import start_multimask_from_single
from fastsam3d.transforms import CropGrid, normalize_crop, sample_crop, upsample_logits
from fastsam3d.weights import default_checkpoint

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "ts_abdomen_ct"


def crops(labels: list[int]) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
    """(label, normalised crop, target) per label, crops centred on the object."""
    case = load_case("ts_abdomen_ct", DATA / "image.nii.gz", DATA / "label.nii.gz")
    out = []
    for value in labels:
        centre = case.objects[value].double().mean(0).cpu().numpy()
        grid = CropGrid.around((case.affine @ np.append(centre, 1.0))[:3], size=128)
        image = normalize_crop(sample_crop(case.image, case.affine, grid))
        out.append((value, image, sample_crop(case.label == value, case.affine, grid) > 0.5))
    return out


@torch.no_grad()
def outputs(model: torch.nn.Module, image: torch.Tensor, target: torch.Tensor):
    """Crop Dice, predicted IoU and stability score of the 4 outputs after the first click."""
    gen = torch.Generator().manual_seed(2023)
    point, label = next_click(torch.zeros_like(target[:, 0]), target[:, 0], "ritm", gen)
    sparse, dense = model.prompt_encoder(
        points=(point.float(), label), boxes=None, masks=torch.zeros(1, 1, 32, 32, 32)
    )
    pe = model.prompt_encoder.get_dense_pe()
    emb = model.image_encoder(image)
    logits, iou = model.mask_decoder(emb, pe, sparse, dense, False, outputs=range(4))
    up = upsample_logits(logits, target.shape[-1])[0]
    t = target[0, 0]
    dice = [2 * ((m > 0) & t).sum().item() / max(1, ((m > 0).sum() + t.sum()).item()) for m in up]
    stability = [((m > 1).sum() / (m > -1).sum().clamp_min(1)).item() for m in up]
    return dice, iou[0].tolist(), stability


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="*")
    parser.add_argument("--copied-default", action="store_true")
    args = parser.parse_args()
    labels = REPORT_LABELS
    selection = np.isin(labels, labels[::2])
    data = crops(labels)
    models = {}
    if args.copied_default:
        models["default, heads copied"] = build_model(checkpoint=default_checkpoint())
        start_multimask_from_single(models["default, heads copied"])
    models |= {path: load_model(path) for path in args.checkpoints}
    for name, model in models.items():
        rows = [outputs(model.eval(), image, target) for _, image, target in data]
        dice, iou, stab = (np.array([r[i] for r in rows]) for i in range(3))
        print(
            f"{name}: Dice per output {dice.mean(0).round(3)}, predicted IoU {iou.mean(0).round(3)}"
        )
        rules = {
            "single output": np.zeros(len(rows), int),
            "IoU head, all 4 (Session)": iou.argmax(1),
            "IoU head, multimask 3 (SAM)": iou[:, 1:].argmax(1) + 1,
            "stability, all 4": stab.argmax(1),
            "oracle": dice.argmax(1),
        }
        for rule, pick in rules.items():
            d = dice[np.arange(len(rows)), pick]
            print(
                f"  {rule:28s} 45 labels {d.mean():.3f}  selection {d[selection].mean():.3f}  "
                f"other 22 {d[~selection].mean():.3f}  picks {np.bincount(pick, minlength=4)}"
            )


if __name__ == "__main__":
    main()
