"""The training loop shared by ``train``, ``finetune`` and ``distill``.

* :class:`BatchSource` mixes GPU-generated synthetic volumes with augmented real crops.
* :func:`click_loss` is the official interactive loop (SPEC §10-11): the image is encoded once,
  then several prompt rounds run the prompt encoder and decoder, each round's low-res logits fed
  back as the next mask prompt; the first prompt is a click inside the object (or, with
  probability ``box_prob``, a jittered bounding box), later clicks fall in the error region of the
  previous prediction (positive on misses, negative on false positives). Clicks accumulate, as a
  :class:`fastsam3d.Session` sends them. Loss per round: Dice + cross-entropy on the mask
  upsampled to the crop, plus the IoU head's MSE; averaged over rounds. For models with
  ``first_click_multimask`` the first click also trains SAM's multimask outputs
  (:func:`start_multimask_from_single`, ``finetune --multimask``).
* :func:`run` owns the rest: fused AdamW, warm-up + cosine schedule (driven by steps or by the
  wall-clock budget, whichever is further along, so a time-limited run still anneals), bf16
  autocast on CUDA, gradient clipping, resumable checkpoints (weights in safetensors, optimizer
  state loaded with ``weights_only=True``), a CSV log and rich progress.

Checkpoint folder layout (``out/``): ``model.safetensors`` (the model, loadable by
:func:`fastsam3d.build_model`), ``extra.safetensors`` (e.g. distillation projections),
``optimizer.pt`` and ``state.json`` (step, elapsed seconds, config), ``log.csv``; with a
validator also ``val.csv`` and ``best.safetensors`` (the best-scoring weights so far).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from fastsam3d.atomic import atomic_path, write_text
from fastsam3d.checkpoint import read_checkpoint, save_safetensors
from fastsam3d.errors import FastSAM3DError
from fastsam3d.simulate import Rule, next_click
from fastsam3d.training.data import REAL_ZOOM, Case, RealCropSampler
from fastsam3d.training.losses import dice_ce_loss, dice_ce_per_mask, iou_head_loss
from fastsam3d.training.synthetic import SyntheticConfig, generate, pick_targets
from fastsam3d.transforms import MODEL_SPACING_MM, normalize_crop, upsample_logits


@dataclass
class Batch:
    """image (B, 1, S, S, S) normalised; target (T, 1, S, S, S) bool, one object per row;
    image_index (T,) int64, the image each target lies in (the encoder runs once per image
    and its embedding serves every target of that image, as SAM trains several masks per
    image); first_click (T, 3) int64 crop voxel of the first positive click, or -1 where the
    click rule chooses it."""

    image: Tensor
    target: Tensor
    first_click: Tensor
    image_index: Tensor


class BatchSource:
    """Batches of synthetic volumes (GPU) mixed with real crops (``real_fraction`` of each).

    Every image carries ``targets_per_image`` targets: distinct structures of a synthetic
    volume, or the real crop's object again with another first click. With ``pool_size`` > 0
    synthetic volumes come from a pool kept on the device (each drawn one flipped and
    transposed at random, with fresh targets and intensity jitter) of which ``refresh``
    are regenerated every batch: the generator costs more than a training step on a GPU.
    Real crops are sampled at ``crop_spacing`` mm per voxel (the model's ``crop_spacing_mm``,
    so that a model trains at the spacing it is used at), zoomed by a factor in ``real_scale``.
    """

    def __init__(
        self,
        batch_size: int,
        device: torch.device,
        seed: int = 0,
        cases: list[Case] | None = None,
        real_fraction: float = 0.25,
        synthetic: SyntheticConfig | None = None,
        targets_per_image: int = 1,
        pool_size: int = 0,
        refresh: int = 2,
        crop_spacing: float = MODEL_SPACING_MM,
        real_scale: tuple[float, float] = REAL_ZOOM,
    ) -> None:
        self.batch_size = batch_size
        self.device = device
        self.synthetic = synthetic or SyntheticConfig()
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.real = (
            RealCropSampler(cases, seed, self.synthetic.size, crop_spacing, real_scale)
            if cases
            else None
        )
        self.n_real = round(batch_size * real_fraction) if cases else 0
        self.targets = targets_per_image
        self.refresh = refresh
        self.pool: tuple[Tensor, Tensor] | None = None
        if pool_size:
            images, labels = zip(
                *(self._fresh(min(16, pool_size - i)) for i in range(0, pool_size, 16))
            )
            self.pool = (torch.cat(images), torch.cat(labels))

    def _fresh(self, n: int) -> tuple[Tensor, Tensor]:
        """n newly generated volumes: normalised image (n, 1, S, S, S) and labels (n, S, S, S)."""
        syn = generate(n, self.generator, self.synthetic)
        return normalize_crop(syn.image).to(torch.float16), syn.labels

    def _synthetic(self, n: int) -> tuple[Tensor, Tensor]:
        """n synthetic volumes, fresh or drawn from the pool (see the class docstring)."""
        if self.pool is None:
            image, labels = self._fresh(n)
            return image.float(), labels
        gen, dev = self.generator, self.device
        pool_image, pool_labels = self.pool
        if self.refresh:
            slots = torch.randint(len(pool_image), (self.refresh,), generator=gen, device=dev)
            pool_image[slots], pool_labels[slots] = self._fresh(self.refresh)
        pick = torch.randint(len(pool_image), (n,), generator=gen, device=dev)
        flips = torch.rand((n, 3), generator=gen, device=dev) < 0.5
        orders = torch.rand((n, 3), generator=gen, device=dev).argsort(dim=1).tolist()
        images, labels = [], []
        for i, (flip, order) in enumerate(zip(flips.tolist(), orders)):
            dims = [d for d, f in enumerate(flip) if f]
            lab = pool_labels[pick[i]].permute(order).flip(dims)
            img = pool_image[pick[i], 0].permute(order).flip(dims)
            images.append(img[None].float())
            labels.append(lab)
        return self._intensity_augment(torch.stack(images)), torch.stack(labels)

    def next(self) -> Batch:
        """The next batch (synthetic images first, then real; targets grouped by image)."""
        n_syn, k = self.batch_size - self.n_real, self.targets
        images, targets, clicks = [], [], []
        if n_syn:
            image, labels = self._synthetic(n_syn)
            ids = pick_targets(
                labels, self.synthetic.structures, self.synthetic.min_target_voxels,
                self.generator, k,
            )  # fmt: skip
            target = labels[:, None] == ids.view(n_syn, k, 1, 1, 1).to(labels.dtype)
            target, click = self._centre_target(labels, target)
            images.append(image)
            targets.append(target.reshape(n_syn * k, 1, *target.shape[2:]))
            clicks.append(click.reshape(n_syn * k, 3))
        if self.n_real:
            image, target, click = self.real.sample(self.n_real)
            images.append(self._intensity_augment(normalize_crop(image)))
            targets.append(target.repeat_interleave(k, dim=0))
            # The crop's own click first, random clicks inside the object for the others.
            click = click[:, None].repeat(1, k, 1)
            click[:, 1:] = -1
            clicks.append(click.reshape(-1, 3))
        n_images = n_syn + self.n_real
        index = torch.arange(n_images, device=self.device).repeat_interleave(k)
        return Batch(torch.cat(images), torch.cat(targets), torch.cat(clicks), index)

    def _centre_target(self, labels: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """For half the volumes, make the structure under a voxel near the centre the first
        target and that voxel its first click, as when a Session centres its crop on the first
        click. ``target`` (B, K, S, S, S) bool; returns it and first clicks (B, K, 3)."""
        b, k, s = labels.shape[0], target.shape[1], labels.shape[-1]
        gen, dev = self.generator, labels.device
        voxel = s // 2 + torch.randint(-6, 7, (b, 3), generator=gen, device=dev)
        value = labels[torch.arange(b, device=dev), voxel[:, 0], voxel[:, 1], voxel[:, 2]]
        use = (torch.rand((b,), generator=gen, device=dev) < 0.5) & (value > 0)
        centred = labels == value.view(b, 1, 1, 1)
        target = target.clone()
        target[:, 0] = torch.where(use.view(b, 1, 1, 1), centred, target[:, 0])
        click = torch.full((b, k, 3), -1, dtype=torch.long, device=dev)
        click[:, 0] = torch.where(use[:, None], voxel, click[:, 0])
        return target, click

    def _intensity_augment(self, x: Tensor) -> Tensor:
        """Random contrast scale, shift and Gaussian noise of normalised crops."""
        b, gen, dev = x.shape[0], self.generator, x.device
        shape = (b, 1, 1, 1, 1)
        scale = 0.85 + 0.3 * torch.rand(shape, generator=gen, device=dev)
        shift = 0.2 * torch.rand(shape, generator=gen, device=dev) - 0.1
        sigma = 0.05 * torch.rand(shape, generator=gen, device=dev)
        noise = torch.randn(x.shape, generator=gen, device=dev)
        return (x * scale + shift + sigma * noise) * (x != 0)


def jittered_boxes(target: Tensor, generator: torch.Generator) -> Tensor:
    """Bounding boxes of (B, 1, S, S, S) targets, each face moved by up to 10% of the extent
    plus 2 voxels; (B, 2, 3) float lo/hi corners in crop voxel units, clamped to the crop."""
    b, s = target.shape[0], target.shape[-1]
    idx = torch.arange(s, device=target.device, dtype=torch.float32)
    los, his = [], []
    for dims in ((2, 3), (1, 3), (1, 2)):
        present = target[:, 0].any(dim=dims)  # (B, S) along one axis
        lo = torch.where(present, idx, float(s)).amin(dim=1)
        hi = torch.where(present, idx, -1.0).amax(dim=1)
        los.append(lo.clamp(max=s - 1))
        his.append(hi.clamp(min=0))
    lo, hi = torch.stack(los, 1), torch.stack(his, 1)
    extent = (hi - lo).clamp_min(1)
    jit = torch.rand((b, 2, 3), generator=generator, device=target.device) * 2 - 1
    lo = lo + jit[:, 0] * (0.1 * extent + 2)
    hi = hi + jit[:, 1] * (0.1 * extent + 2)
    return torch.stack([lo, hi], dim=1).clamp(0, s - 1)


def click_loss(
    model: nn.Module,
    batch: Batch,
    generator: torch.Generator,
    rounds: int = 5,
    box_prob: float = 0.0,
    embedding: Tensor | None = None,
    rule: Rule = "random",
) -> tuple[Tensor, dict[str, float]]:
    """Interactive training loss of one batch (see module docstring).

    Args:
        model: a :class:`fastsam3d.modeling.Sam3D`.
        batch: images, targets and optional first clicks.
        generator: drives click sampling and the box decision (on the batch's device).
        rounds: prompt rounds per sample (the first is the first click or the box).
        box_prob: probability that the batch starts from a jittered box instead of a click
            (ignored when the model has no box embeddings).
        embedding: a precomputed image embedding (else the encoder runs here, with gradient).
        rule: click rule of :func:`fastsam3d.simulate.next_click` (training samples the error
            region at random, as the official loop; validation clicks its centre).

    Returns:
        The mean loss over rounds and metrics: loss, seg/iou parts, Dice after each round.
    """
    image, target = batch.image, batch.target
    multimask = model.config is not None and model.config.first_click_multimask
    emb = model.image_encoder(image) if embedding is None else embedding
    emb = emb[batch.image_index]
    b, s = target.shape[0], image.shape[-1]
    low = model.config.low_res_size if model.config is not None else s // 4
    pe = model.prompt_encoder.get_dense_pe()
    mask_in = torch.zeros((b, 1, low, low, low), device=image.device)
    pred = torch.zeros_like(target[:, 0])
    use_box = model.prompt_encoder.accepts_boxes and (
        torch.rand((), generator=generator, device=generator.device).item() < box_prob
    )
    boxes = jittered_boxes(target, generator) if use_box else None
    points: list[Tensor] = []
    labels: list[Tensor] = []
    total = torch.zeros((), device=image.device)
    metrics: dict[str, float] = {"seg": 0.0, "iou": 0.0}
    for r in range(rounds):
        if r > 0 or not use_box:
            p, lab = next_click(pred, target[:, 0], rule=rule, generator=generator)
            if r == 0:
                given = batch.first_click >= 0
                p = torch.where(given[:, None, :], batch.first_click[:, None, :], p)
                lab = torch.where(given[:, :1], torch.ones_like(lab), lab)
            points.append(p)
            labels.append(lab)
        prompt = (torch.cat(points, 1).float(), torch.cat(labels, 1)) if points else None
        sparse, dense = model.prompt_encoder(points=prompt, boxes=boxes, masks=mask_in)
        if r == 0 and multimask and not use_box:
            logits, up, seg, iou_l = _multimask_round(model, emb, pe, sparse, dense, target)
        else:
            logits, iou = model.mask_decoder(emb, pe, sparse, dense, multimask_output=False)
            up = upsample_logits(logits.float(), s)
            seg = dice_ce_loss(up, target)
            iou_l = iou_head_loss(iou, up, target)
        total = total + seg + iou_l
        metrics["seg"] += seg.item() / rounds
        metrics["iou"] += iou_l.item() / rounds
        mask_in = logits.detach().float()
        pred = up.detach()[:, 0] > 0
        inter = (pred & target[:, 0]).sum((1, 2, 3)).float()
        size = pred.sum((1, 2, 3)) + target[:, 0].sum((1, 2, 3))
        metrics[f"dice{r + 1}"] = (2 * inter / size.clamp_min(1)).mean().item()
    loss = total / rounds
    metrics["loss"] = loss.item()
    return loss, metrics


def _multimask_round(
    model: nn.Module, emb: Tensor, pe: Tensor, sparse: Tensor, dense: Tensor, target: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A lone first click with SAM's multimask rule: the single mask is trained as usual, of the
    3 multimask outputs only the one with the lowest loss (a click may mean a part or the
    whole), and the IoU head on all 4. The answer, as a :class:`~fastsam3d.Session` gives it,
    is the output of the 4 with the highest predicted IoU.

    Returns:
        The answer's low-res logits (B, 1, L, L, L) and upsampled logits, segmentation loss,
        IoU-head loss.
    """
    s, dec = target.shape[-1], model.mask_decoder
    logits, iou = dec(emb, pe, sparse, dense, False, outputs=range(dec.num_mask_tokens))
    up = upsample_logits(logits.float(), s)
    per_mask = dice_ce_per_mask(up, target)  # (B, 4)
    seg = per_mask[:, 0].mean() + per_mask[:, 1:].min(dim=1).values.mean()
    iou_l = iou_head_loss(iou, up, target)
    pick = iou.detach().argmax(dim=1).view(-1, 1, 1, 1, 1)
    index = pick.expand(-1, 1, *logits.shape[2:])
    return logits.gather(1, index), up.gather(1, pick.expand(-1, 1, s, s, s)), seg, iou_l


def start_multimask_from_single(model: nn.Module) -> None:
    """Give the 3 multimask outputs the trained single output's hypernetwork MLP and IoU-head
    row, and set ``first_click_multimask``. The mask tokens stay (they are inputs the single
    output attends to), so the single output is unchanged and, the 4 predicted IoUs being
    equal, a first click is answered as before until fine-tuning tells the outputs apart."""
    dec = model.mask_decoder
    with torch.no_grad():
        head = dec.iou_prediction_head.layers[-1]
        head.weight[1:] = head.weight[:1]
        head.bias[1:] = head.bias[:1]
        for mlp in dec.output_hypernetworks_mlps[1:]:
            mlp.load_state_dict(dec.output_hypernetworks_mlps[0].state_dict())
    model.config = dataclasses.replace(model.config, first_click_multimask=True)


@dataclass
class LoopConfig:
    """Optimisation and bookkeeping settings shared by train, finetune and distill."""

    steps: int = 1000
    batch_size: int = 8
    lr: float = 4e-4
    weight_decay: float = 0.05
    warmup_fraction: float = 0.03
    min_lr_ratio: float = 0.05
    grad_clip: float = 1.0
    max_minutes: float | None = None  # stop this session after this much wall-clock (total)
    schedule_minutes: float | None = None  # horizon of the time-driven schedule (default max)
    save_every: int = 250
    keep_every: int = 0  # also keep the weights every N steps in snapshots/ (0: never)
    val_every: int = 250  # steps between validations (when run() is given a validator)
    log_every: int = 10
    seed: int = 0
    amp: bool = True
    device: str = "auto"
    extra: dict[str, Any] = field(default_factory=dict)  # recorded in state.json (recipe)


def resolve_device(device: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def lr_factor(progress: float, warmup_fraction: float, min_ratio: float) -> float:
    """Linear warm-up then cosine decay to ``min_ratio``; ``progress`` in [0, 1]."""
    if progress < warmup_fraction:
        return max(progress / max(warmup_fraction, 1e-8), 1e-3)
    t = (progress - warmup_fraction) / max(1 - warmup_fraction, 1e-8)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def _save_state(
    out: Path, model: nn.Module, extra: nn.Module | None, opt: torch.optim.Optimizer, state: dict
) -> None:
    save_safetensors(model, out / "model.safetensors", overwrite=True)
    if extra is not None and len(extra.state_dict()):
        with atomic_path(out / "extra.safetensors") as tmp:
            save_file({k: v.contiguous() for k, v in extra.state_dict().items()}, str(tmp))
    with atomic_path(out / "optimizer.pt") as tmp:
        torch.save(opt.state_dict(), tmp)
    write_text(out / "state.json", json.dumps(state, indent=1))


def _load_state(
    out: Path, model: nn.Module, extra: nn.Module | None, opt: torch.optim.Optimizer
) -> dict:
    model.load_state_dict(read_checkpoint(out / "model.safetensors")[0], strict=True)
    if extra is not None and (out / "extra.safetensors").exists():
        extra.load_state_dict(load_file(str(out / "extra.safetensors")), strict=True)
    opt.load_state_dict(torch.load(out / "optimizer.pt", weights_only=True, map_location="cpu"))
    return json.loads((out / "state.json").read_text())


def _append_csv(path: Path, row: dict[str, Any]) -> None:
    """Append ``row`` to a CSV file, writing the header when the file is new."""
    new = not path.exists() or path.stat().st_size == 0
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row), extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerow(row)


Objective = Callable[[Batch, float], tuple[Tensor, dict[str, float]]]


def run(
    model: nn.Module,
    objective: Objective,
    source: BatchSource,
    cfg: LoopConfig,
    out: str | Path,
    extra: nn.Module | None = None,
    resume: bool = True,
    console: Any = None,
    validate: Callable[[nn.Module], dict[str, float]] | None = None,
) -> dict[str, Any]:
    """Optimise ``model`` (and ``extra``) on ``objective(batch, progress)`` until ``cfg.steps``
    or ``cfg.max_minutes`` (total, resumed time included); returns the final ``state.json``.

    ``progress`` in [0, 1] is how far the run is (steps or wall-clock, whichever is further):
    schedules such as progressive distillation read it. With ``resume`` and an existing
    ``out/state.json`` the run continues from the saved step, elapsed time and optimizer state.

    With ``validate`` (e.g. a :class:`fastsam3d.training.validate.CropValidator`), the model is
    scored before the first step, every ``cfg.val_every`` steps and at the end; each result is a
    row of ``val.csv`` and the best ``score`` so far is kept as ``best.safetensors`` (its step in
    ``state.json``). Validation time counts towards the run's minutes.
    """
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    console = console or Console()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = source.device
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    if extra is not None:
        extra.to(device).train()
        params += [p for p in extra.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(
        params,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        betas=(0.9, 0.95),
        fused=device.type == "cuda",
    )
    step, elapsed = 0, 0.0
    best: dict[str, float] = {}  # step and score of the best validation so far
    if resume and (out / "state.json").exists():
        state = _load_state(out, model, extra, opt)
        step, elapsed, best = state["step"], state["elapsed_s"], state.get("best", {})
        console.print(f"resuming {out} at step {step} ({elapsed / 60:.1f} min done)")
        # Fresh data after a resume: reseed from the step so the continuation differs.
        source.generator.manual_seed(cfg.seed + step)
    horizon = cfg.schedule_minutes or cfg.max_minutes
    budget_s = horizon * 60 if horizon else None
    stop_s = cfg.max_minutes * 60 if cfg.max_minutes else None
    log_path = out / "log.csv"
    writer_file = log_path.open("a", newline="")
    writer: csv.DictWriter | None = None
    autocast = torch.autocast(
        device.type, dtype=torch.bfloat16, enabled=cfg.amp and device.type == "cuda"
    )
    state: dict[str, Any] = {}
    t_start = time.perf_counter() - elapsed

    def validation(s: int) -> None:
        with autocast:
            metrics = validate(model)
        row = {"step": s, "time_s": round(time.perf_counter() - t_start, 2)}
        row.update({k: round(v, 5) for k, v in metrics.items()})
        _append_csv(out / "val.csv", row)
        console.print("validation: " + ", ".join(f"{k} {v:.4g}" for k, v in row.items()))
        if metrics["score"] > best.get("score", -1.0):
            save_safetensors(model, out / "best.safetensors", overwrite=True)
            best.update(step=s, score=metrics["score"])

    def save(s: int, row: dict[str, Any] | None) -> dict[str, Any]:
        state = {
            "step": s,
            "elapsed_s": time.perf_counter() - t_start,
            "loop": asdict(cfg),
            "last": row,
            **({"best": best} if best else {}),
        }
        _save_state(out, model, extra, opt, state)
        return state

    def keep(s: int) -> None:
        path = out / "snapshots" / f"step_{s:06d}.safetensors"
        save_safetensors(model, path, overwrite=True)

    def progress_of(s: int) -> float:
        p = s / cfg.steps
        if budget_s:
            p = max(p, (time.perf_counter() - t_start) / budget_s)
        return min(p, 1.0)

    def finished(s: int) -> bool:
        over_time = stop_s is not None and time.perf_counter() - t_start >= stop_s
        return s >= cfg.steps or progress_of(s) >= 1.0 or over_time

    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"))
    if step == 0:  # where a fresh run starts (e.g. the weights a fine-tune begins from)
        if validate is not None:
            validation(0)
        if cfg.keep_every:
            keep(0)
    with Progress(*columns, TimeElapsedColumn(), console=console, transient=False) as bar:
        task = bar.add_task("train", total=cfg.steps, completed=step, info="")
        last_save = step
        while not finished(step):
            t0 = time.perf_counter()
            progress = progress_of(step)
            for group in opt.param_groups:
                group["lr"] = cfg.lr * lr_factor(progress, cfg.warmup_fraction, cfg.min_lr_ratio)
            batch = source.next()
            with autocast:
                loss, metrics = objective(batch, progress)
            if not torch.isfinite(loss):
                raise FastSAM3DError(f"loss became {loss.item()} at step {step}; lower --lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip).item()
            opt.step()
            step += 1
            row = {
                "step": step,
                "time_s": round(time.perf_counter() - t_start, 2),
                "lr": opt.param_groups[0]["lr"],
                "grad_norm": round(grad_norm, 4),
                "step_s": round(time.perf_counter() - t0, 4),
                **{k: round(v, 5) for k, v in metrics.items()},
            }
            if writer is None:
                writer = csv.DictWriter(writer_file, fieldnames=list(row), extrasaction="ignore")
                if log_path.stat().st_size == 0:
                    writer.writeheader()
            writer.writerow(row)
            info = f"loss {metrics['loss']:.4f}"
            bar.update(task, completed=step, info=info)
            if step % cfg.log_every == 0:
                writer_file.flush()
                console.print(", ".join(f"{k} {v:.4g}" for k, v in row.items()))
            if validate is not None and (step % cfg.val_every == 0 or finished(step)):
                validation(step)
            if step - last_save >= cfg.save_every or finished(step):
                state = save(step, row)
                last_save = step
            if cfg.keep_every and step % cfg.keep_every == 0:
                keep(step)
    writer_file.close()
    if not state:  # the budget ran out before a step (in the step-0 validation, or a resume)
        state = save(step, None)
    return state
