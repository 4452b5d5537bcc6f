"""``fastsam3d train | finetune | distill | models``: training and weights management."""

from __future__ import annotations

import json
import shlex
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from fastsam3d.cli import app
from fastsam3d.cli._common import user_errors
from fastsam3d.errors import FastSAM3DError, OutputExistsError

console = Console()

OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Run folder (checkpoints, log.csv).")]
DataOpt = Annotated[
    list[Path] | None,
    typer.Option("--data", help="Folder of labelled NIfTI volumes (repeatable; see README)."),
]
CasesOpt = Annotated[
    Path | None,
    typer.Option("--cases", help="Prepared real cases (.safetensors from --save-cases)."),
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Model config override KEY=VALUE, e.g. embed_dim=384 (repeatable)."),
]
SynthOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--synthetic",
        help="Synthetic generator setting KEY=VALUE, e.g. structures=30 (repeatable; the fields "
        "of fastsam3d.training.synthetic.SyntheticConfig).",
    ),
]
StepsOpt = Annotated[int, typer.Option(help="Optimiser steps.")]
BatchOpt = Annotated[int, typer.Option(help="Crops per step.")]
LrOpt = Annotated[float, typer.Option(help="Peak learning rate (AdamW).")]
MinutesOpt = Annotated[
    float | None, typer.Option(help="Stop after this many minutes in total (resumes included).")
]
HorizonOpt = Annotated[
    float | None,
    typer.Option(
        help="Minutes the cosine schedule spans (default --max-minutes); a run cut "
        "into several sessions keeps one schedule."
    ),
]
RoundsOpt = Annotated[int, typer.Option(help="Prompt rounds per crop (clicks, box first).")]
BoxOpt = Annotated[float, typer.Option(help="Probability that a batch starts from a box.")]
RealOpt = Annotated[float, typer.Option(help="Fraction of each batch from real crops.")]
SeedOpt = Annotated[int, typer.Option(help="Seed of data, clicks and initialisation.")]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1 ...")]
ResumeOpt = Annotated[bool, typer.Option(help="Continue a run found in --out.")]
OverwriteOpt = Annotated[bool, typer.Option(help="Start afresh in an --out that holds a run.")]
SaveEveryOpt = Annotated[int, typer.Option(help="Checkpoint every N steps.")]
KeepEveryOpt = Annotated[
    int,
    typer.Option(
        help="Also keep the weights every N steps as snapshots/step_N.safetensors, e.g. to "
        "average them (`fastsam3d convert --mean-with`); 0: keep none."
    ),
]
RealScaleOpt = Annotated[
    str | None,
    typer.Option(
        help="MIN,MAX of the random zoom of real crops about their click (1: the model's crop "
        "spacing; default 0.85,1.15); a wider range shows each real object at more sizes."
    ),
]
TargetsOpt = Annotated[
    int, typer.Option(help="Objects trained per crop (one encoder pass serves them all).")
]
ValCasesOpt = Annotated[
    Path | None,
    typer.Option(
        "--val-cases",
        help="Held-out prepared cases (from --save-cases): score the model on them every "
        "--val-every steps (val.csv) and keep the best weights as best.safetensors.",
    ),
]
ValEveryOpt = Annotated[int, typer.Option(help="Steps between validations (with --val-cases).")]
PoolOpt = Annotated[
    int,
    typer.Option(help="Synthetic volumes kept on the device and reused (0: generate every batch)."),
]


def _overrides(items: list[str] | None, option: str = "--set") -> dict[str, Any]:
    """``["embed_dim=384", "attention=global"]`` -> typed dict (JSON values, else strings)."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise typer.BadParameter(f"{option} expects KEY=VALUE, got {item!r}")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def _synthetic(items: list[str] | None, size: int):
    """The generator's settings: its defaults, ``--synthetic`` values checked against its
    fields and their types, and the model's crop size."""
    from dataclasses import fields

    from fastsam3d.training.synthetic import SyntheticConfig

    defaults = {f.name: f.default for f in fields(SyntheticConfig) if f.name != "size"}
    given = _overrides(items, "--synthetic")
    for key, value in given.items():
        if key not in defaults:
            raise typer.BadParameter(
                f"--synthetic: no setting {key!r}; the settings are {', '.join(defaults)}"
            )
        kind = type(defaults[key])
        if kind is float and isinstance(value, int):
            given[key] = value = float(value)
        if type(value) is not kind:
            raise typer.BadParameter(f"--synthetic {key}: expected {kind.__name__}, got {value!r}")
    return SyntheticConfig(size=size, **given), given


def _prepare_out(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to mix a new run into a folder holding one, unless resuming or overwriting."""
    state = out / "state.json"
    if state.exists() and not resume:
        if not overwrite:
            raise OutputExistsError(
                f"{out} already holds a run; pass --resume to continue it or --overwrite to restart"
            )
        for name in (
            "state.json",
            "optimizer.pt",
            "model.safetensors",
            "extra.safetensors",
            "log.csv",
            "val.csv",
            "best.safetensors",
        ):
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(out / "snapshots", ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)


def _cases(data: list[Path] | None, cases: Path | None, save_cases: Path | None, device):
    from fastsam3d.training.data import load_cases, prepare_cases
    from fastsam3d.training.data import save_cases as save

    if data:
        prepared = prepare_cases(list(data))
        if save_cases is not None:
            save(prepared, save_cases)
            console.print(f"saved {len(prepared)} prepared cases to {save_cases}")
        return [c.to(device) for c in prepared]
    if cases is not None:
        return load_cases(cases, device)
    return None


def _run_click_training(
    model, out, data, cases, save_cases, steps, batch_size, lr, max_minutes, schedule_minutes,
    rounds, box_prob, real_fraction, seed, device, resume, overwrite, save_every, recipe: dict[str, Any],
    targets: int = 1, pool: int = 0, synthetic: list[str] | None = None,
    val_cases: Path | None = None, val_every: int = 250, keep_every: int = 0,
    real_scale: str | None = None, objective_for: Callable[[Any], tuple[Any, Any]] | None = None,
) -> None:  # fmt: skip
    """Shared body of ``train``, ``finetune`` and ``distill``: the loop on synthetic + real
    crops. The objective is the click loss, or ``objective_for(device)`` -> (objective, module
    whose state is saved beside the model) for distillation."""
    import torch

    from fastsam3d.training.loop import BatchSource, LoopConfig, click_loss, resolve_device, run

    synth, synth_given = _synthetic(synthetic, model.config.img_size)
    zoom = _scale_range(real_scale)
    dev = resolve_device(device)
    extra = None
    if objective_for is None:
        gen = torch.Generator(device=dev).manual_seed(seed + 1)

        def objective(batch, progress):
            return click_loss(model, batch, gen, rounds=rounds, box_prob=box_prob)
    else:
        objective, extra = objective_for(dev)
    real = _cases(data, cases, save_cases, dev)  # inputs first: a bad file stops before any write
    validate = _validator(val_cases, dev, model.config)
    _prepare_out(out, resume, overwrite)
    if steps == 0:
        return
    cfg = LoopConfig(
        steps=steps, batch_size=batch_size, lr=lr, max_minutes=max_minutes, seed=seed,
        device=str(dev), save_every=save_every, schedule_minutes=schedule_minutes,
        val_every=val_every, keep_every=keep_every,
        extra={**recipe, "rounds": rounds, "box_prob": box_prob, "real_fraction": real_fraction,
               "real_scale": list(zoom),
               "targets_per_image": targets, "pool": pool, "synthetic": synth_given,
               "real_cases": [c.name for c in real or []]},
    )  # fmt: skip
    source = BatchSource(
        batch_size, dev, seed, real, real_fraction if real else 0.0,
        synth, targets, pool, crop_spacing=model.config.crop_spacing_mm, real_scale=zoom,
    )  # fmt: skip
    state = run(model, objective, source, cfg, out, extra=extra, resume=resume, console=console,
                validate=validate)  # fmt: skip
    _report_done(state, out)


def _scale_range(text: str | None) -> tuple[float, float]:
    """``"0.7,1.5"`` -> (0.7, 1.5), checked: two positive numbers, MIN <= MAX; None -> the
    sampler's default range."""
    if text is None:
        from fastsam3d.training.data import REAL_ZOOM

        return REAL_ZOOM
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        raise typer.BadParameter(f"--real-scale expects MIN,MAX, e.g. 0.7,1.5; got {text!r}")
    if not 0 < low <= high:
        raise typer.BadParameter(f"--real-scale needs 0 < MIN <= MAX, got {text!r}")
    return low, high


def _validator(val_cases: Path | None, device, config):
    """A :class:`CropValidator` of ``--val-cases`` (None without them), on crops of the model's
    size and spacing."""
    if val_cases is None:
        return None
    from fastsam3d.training.data import load_cases
    from fastsam3d.training.validate import CropValidator

    cases = load_cases(val_cases, device)
    validator = CropValidator(cases, size=config.img_size, spacing=config.crop_spacing_mm)
    console.print(f"validating on {len(validator)} held-out objects from {val_cases}")
    return validator


def _report_done(state: dict[str, Any], out: Path) -> None:
    console.print(f"done: step {state.get('step')}, weights in {out / 'model.safetensors'}")
    if "best" in state:
        best = state["best"]
        console.print(
            f"best validation score {best['score']:.4f} at step {best['step']}: "
            f"{out / 'best.safetensors'}"
        )


@app.command()
def train(
    out: OutOpt,
    arch: Annotated[str, typer.Option(help="Architecture to train (see `fastsam3d info`).")] = (
        "fastsam3d_dilated"
    ),
    set_: SetOpt = None,
    data: DataOpt = None,
    cases: CasesOpt = None,
    save_cases: Annotated[Path | None, typer.Option(help="Also save the prepared --data.")] = None,
    steps: StepsOpt = 2000,
    batch_size: BatchOpt = 8,
    lr: LrOpt = 4e-4,
    max_minutes: MinutesOpt = None,
    schedule_minutes: HorizonOpt = None,
    rounds: RoundsOpt = 5,
    box_prob: BoxOpt = 0.2,
    real_fraction: RealOpt = 0.25,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    resume: ResumeOpt = False,
    overwrite: OverwriteOpt = False,
    save_every: SaveEveryOpt = 250,
    targets: TargetsOpt = 4,
    pool: PoolOpt = 0,
    synthetic: SynthOpt = None,
    val_cases: ValCasesOpt = None,
    val_every: ValEveryOpt = 250,
    keep_every: KeepEveryOpt = 0,
    real_scale: RealScaleOpt = None,
) -> None:
    """Train a model from scratch with the interactive click loop (synthetic + real crops)."""
    import torch

    from fastsam3d.registry import build_model

    with user_errors(ValueError):
        torch.manual_seed(seed)
        model = build_model(arch, **_overrides(set_))
        recipe = {"command": "train", "arch": arch, "overrides": _overrides(set_)}
        _run_click_training(
            model, out, data, cases, save_cases, steps, batch_size, lr, max_minutes,
            schedule_minutes, rounds, box_prob, real_fraction, seed, device, resume, overwrite, save_every, recipe,
            targets, pool, synthetic, val_cases, val_every, keep_every, real_scale,
        )  # fmt: skip


@app.command()
def finetune(
    out: OutOpt,
    data: DataOpt = None,
    cases: CasesOpt = None,
    from_: Annotated[
        str, typer.Option("--from", help="'default' (bundled weights) or a checkpoint path.")
    ] = "default",
    steps: StepsOpt = 500,
    batch_size: BatchOpt = 4,
    lr: LrOpt = 1e-4,
    max_minutes: MinutesOpt = None,
    schedule_minutes: HorizonOpt = None,
    rounds: RoundsOpt = 5,
    box_prob: BoxOpt = 0.2,
    real_fraction: RealOpt = 0.75,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    resume: ResumeOpt = False,
    overwrite: OverwriteOpt = False,
    save_every: SaveEveryOpt = 100,
    targets: TargetsOpt = 4,
    pool: PoolOpt = 0,
    synthetic: SynthOpt = None,
    val_cases: ValCasesOpt = None,
    val_every: ValEveryOpt = 250,
    keep_every: KeepEveryOpt = 0,
    real_scale: RealScaleOpt = None,
    freeze_encoder: Annotated[
        bool,
        typer.Option(
            help="Train only the prompt encoder and mask decoder; the image encoder keeps its "
            "weights and runs without gradient (cheaper: the way to fine-tune on a CPU)."
        ),
    ] = False,
    multimask: Annotated[
        bool,
        typer.Option(
            help="Also train the 3 multimask outputs on the first click (SAM's rule: the best "
            "of the 3 learns), started as copies of the single output; sessions then answer a "
            "first click with the one of highest predicted IoU."
        ),
    ] = False,
) -> None:
    """Fine-tune a model on your own labelled volumes (some synthetic crops keep it general),
    or continue training a checkpoint (--from PATH, with --cases prepared by `train --save-cases`)."""
    from fastsam3d.registry import build_model
    from fastsam3d.training.loop import start_multimask_from_single
    from fastsam3d.weights import default_checkpoint

    with user_errors(ValueError):
        if not data and cases is None:
            raise FastSAM3DError("finetune needs labelled volumes: --data DIR or --cases FILE")
        path = default_checkpoint() if from_ == "default" else Path(from_)
        if path is None:
            raise FastSAM3DError("no default weights are bundled; pass --from PATH")
        model = build_model(checkpoint=path)
        if freeze_encoder:  # no gradient reaches it, so the optimiser never sees its weights
            model.image_encoder.requires_grad_(False)
        if multimask and not model.config.first_click_multimask:
            start_multimask_from_single(model)
        recipe = {
            "command": "finetune", "from": str(path), "freeze_encoder": freeze_encoder,
            "multimask": multimask,
        }  # fmt: skip
        _run_click_training(
            model, out, data, cases, None, steps, batch_size, lr, max_minutes, schedule_minutes,
            rounds, box_prob, real_fraction, seed, device, resume, overwrite, save_every, recipe,
            targets, pool, synthetic, val_cases, val_every, keep_every, real_scale,
        )  # fmt: skip


@app.command()
def distill(
    teacher: Annotated[Path, typer.Option(help="Teacher checkpoint (official or trained here).")],
    out: OutOpt,
    student: Annotated[str, typer.Option(help="Student architecture.")] = "fastsam3d_dilated",
    set_: SetOpt = None,
    schedule: Annotated[
        str, typer.Option(help="decoupled (MobileSAM), progressive (FastSAM3D), dynamic.")
    ] = "progressive",
    feature_loss: Annotated[
        str,
        typer.Option(
            help="mse (the papers' loss) or relative (MSE over the teacher's mean square)."
        ),
    ] = "mse",
    data: DataOpt = None,
    cases: CasesOpt = None,
    steps: StepsOpt = 2000,
    batch_size: BatchOpt = 8,
    lr: LrOpt = 4e-4,
    max_minutes: MinutesOpt = None,
    schedule_minutes: HorizonOpt = None,
    rounds: RoundsOpt = 5,
    box_prob: BoxOpt = 0.2,
    real_fraction: RealOpt = 0.25,
    seed: SeedOpt = 0,
    device: DeviceOpt = "auto",
    resume: ResumeOpt = False,
    overwrite: OverwriteOpt = False,
    save_every: SaveEveryOpt = 250,
    targets: TargetsOpt = 4,
    pool: PoolOpt = 0,
    synthetic: SynthOpt = None,
    val_cases: ValCasesOpt = None,
    val_every: ValEveryOpt = 250,
    keep_every: KeepEveryOpt = 0,
    real_scale: RealScaleOpt = None,
) -> None:
    """Distil a teacher's image encoder into a student (three schedules, see MODEL_CARD.md)."""
    import torch

    from fastsam3d.registry import build_model
    from fastsam3d.training.distill import Distiller

    with user_errors(ValueError):
        torch.manual_seed(seed)
        student_model = build_model(student, **_overrides(set_))

        def distiller_on(dev) -> tuple[Any, Distiller]:
            teacher_model = build_model(checkpoint=teacher, device=dev)
            distiller = Distiller(
                student_model, teacher_model, schedule, rounds, box_prob, feature_loss
            )
            return distiller.objective, distiller

        recipe = {
            "command": "distill", "teacher": str(teacher), "student": student,
            "overrides": _overrides(set_), "schedule": schedule, "feature_loss": feature_loss,
        }  # fmt: skip
        _run_click_training(
            student_model, out, data, cases, None, steps, batch_size, lr, max_minutes,
            schedule_minutes, rounds, box_prob, real_fraction, seed, device, resume, overwrite,
            save_every, recipe, targets, pool, synthetic, val_cases, val_every, keep_every,
            real_scale, objective_for=distiller_on,
        )  # fmt: skip


@app.command()
def models(
    cache: Annotated[
        Path | None,
        typer.Option(help="Cache folder `fastsam3d download` used (default: as it does)."),
    ] = None,
) -> None:
    """List the bundled default model, the architectures and known official checkpoints (with
    their cached downloads)."""
    from fastsam3d.registry import list_architectures
    from fastsam3d.weights import KNOWN_CHECKPOINTS, default_checkpoint
    from fastsam3d.weights.hub import cached_path

    table = Table(title="bundled")
    for col in ("name", "file", "size", "architecture"):
        table.add_column(col)
    path = default_checkpoint()
    if path is None:
        table.add_row("default", "(none bundled)", "", "")
    else:
        from fastsam3d.checkpoint import read_checkpoint

        meta = read_checkpoint(path)[1]
        arch = json.loads(meta.get("config", "{}")).get("arch", "?") if meta else "?"
        table.add_row("default", str(path), f"{path.stat().st_size / 2**20:.1f} MiB", arch)
    console.print(table)
    archs = Table(title="architectures (fastsam3d train --arch NAME)")
    archs.add_column("name")
    archs.add_column("description")
    for name, text in list_architectures():
        archs.add_row(name, text)
    console.print(archs)
    known = Table(title="official checkpoints (fastsam3d download NAME, then --model PATH)")
    known.add_column("name", no_wrap=True)
    known.add_column("architecture")
    known.add_column("Hugging Face file", overflow="fold")
    known.add_column("cached")
    known.add_column("note")
    cached = {k.name: cached_path(k, cache) for k in KNOWN_CHECKPOINTS}
    for k in KNOWN_CHECKPOINTS:
        where = f"{k.repo_id}/{k.filename}"
        known.add_row(k.name, k.arch, where, "yes" if cached[k.name] else "no", k.note)
    console.print(known)
    for name, path in cached.items():
        if path is not None:
            console.print(f"{name}: --model {shlex.quote(str(path))}", markup=False, soft_wrap=True)
