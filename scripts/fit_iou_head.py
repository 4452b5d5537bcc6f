"""Refit a multimask checkpoint's IoU head on real training crops, everything else frozen.

A ``finetune --multimask`` run trains the IoU head along with the masks, and in the session-11
CPU pilot it ended up ranking the single output first on every object although another output
was better on about half of them (scripts/multimask_outputs.py). Here the head alone is fitted
to the actual IoU of each of the 4 outputs after a lone first click: the sampler's click and the
object's centre click, on augmented crops of the real training cases; the image encoder, prompt
encoder and transformer are frozen, so the IoU token's features are computed once. Objects are
split 80 / 20 to stop the fit where held-out objects are ranked best.

    python scripts/fit_iou_head.py CHECKPOINT OUT [--crops 600] [--cases .device_carry/real_train.safetensors]
"""

from __future__ import annotations

import argparse
import copy

import numpy as np
import torch
import torch.nn.functional as F

from fastsam3d.checkpoint import load_model, save_safetensors
from fastsam3d.simulate import next_click
from fastsam3d.training.data import RealCropSampler, load_cases
from fastsam3d.training.losses import mask_iou
from fastsam3d.transforms import normalize_crop, upsample_logits


@torch.no_grad()
def features(model, sampler: RealCropSampler, crops: int):
    """IoU-token features (N, C), actual IoUs (N, 4) and object ids (N,) of first clicks."""
    dec, pe = model.mask_decoder, model.prompt_encoder.get_dense_pe()
    captured = []
    hook = dec.iou_prediction_head.register_forward_pre_hook(lambda m, a: captured.append(a[0]))
    feats, ious, objects = [], [], []
    gen = torch.Generator().manual_seed(0)
    for i in range(crops):
        state = sampler.rng.bit_generator.state  # replayed below to learn the sampled object
        image, target, click = sampler.sample(1)
        probe = np.random.default_rng()
        probe.bit_generator.state = state
        obj = sampler.index[probe.integers(len(sampler.index))]
        emb = model.image_encoder(normalize_crop(image))
        centre, _ = next_click(torch.zeros_like(target[:, 0]), target[:, 0], "ritm", gen)
        for point in (click.view(1, 1, 3), centre):
            prompt = (point.float(), torch.ones(1, 1, dtype=torch.long))
            sparse, dense = model.prompt_encoder(prompt, None, torch.zeros(1, 1, 32, 32, 32))
            logits, _ = dec(emb, pe, sparse, dense, False, outputs=range(4))
            up = upsample_logits(logits, target.shape[-1])
            feats.append(captured.pop()[0])
            ious.append(mask_iou(up, target)[0])
            objects.append(hash(obj))
        if (i + 1) % 100 == 0:
            print(f"{i + 1} crops", flush=True)
    hook.remove()
    return torch.stack(feats), torch.stack(ious), np.array(objects)


def fit(head: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, held: np.ndarray):
    """MSE fit of ``head`` on the kept rows; the epoch with the best held-out pick is kept."""
    best, best_score = copy.deepcopy(head), -1.0
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=0.05)
    keep = ~held
    for epoch in range(400):
        opt.zero_grad()
        F.mse_loss(head(x[keep]), y[keep]).backward()
        opt.step()
        with torch.no_grad():
            pick = head(x[held]).argmax(1)
            score = y[held][torch.arange(int(held.sum())), pick].mean().item()
        if score > best_score:
            best, best_score = copy.deepcopy(head), score
        if epoch % 50 == 0:
            print(f"epoch {epoch}: held-out IoU of the pick {score:.3f}", flush=True)
    return best, best_score


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("out")
    parser.add_argument("--crops", type=int, default=600)
    parser.add_argument("--cases", default=".device_carry/real_train.safetensors")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = load_model(args.checkpoint).eval()
    sampler = RealCropSampler(load_cases(args.cases), seed=1)
    x, y, objects = features(model, sampler, args.crops)
    ids = np.unique(objects)
    held = np.isin(objects, np.random.default_rng(0).permutation(ids)[: len(ids) // 5])
    single = y[held][:, 0].mean().item()
    oracle = y[held].max(1).values.mean().item()
    head = copy.deepcopy(model.mask_decoder.iou_prediction_head).train()
    before = y[held][torch.arange(int(held.sum())), head(x[held]).argmax(1)].mean().item()
    head, score = fit(head, x, y, held)
    print(
        f"held-out objects: IoU of the single output {single:.3f}, of the old head's pick "
        f"{before:.3f}, of the refitted head's pick {score:.3f}, oracle {oracle:.3f}"
    )
    model.mask_decoder.iou_prediction_head.load_state_dict(head.state_dict())
    save_safetensors(model, args.out, overwrite=True)


if __name__ == "__main__":
    main()
