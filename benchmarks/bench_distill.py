"""Encoder-distillation schedules on the same wall-clock budget: a CPU, toy-scale comparison.

    python benchmarks/bench_distill.py [--teacher-minutes 5] [--student-minutes 3] [--threads 1]
        [--schedules decoupled progressive dynamic] [--feature-loss relative mse]

Trains a tiny teacher with the SAM-Med3D layout (``sam_med3d``: windowed + global blocks) with
the click loop on synthetic 32^3 volumes, then one tiny student (``fastsam3d_dilated``, narrower
and shallower, same initial weights every time) four ways for the same minutes each: the three
schedules of ``fastsam3d/training/distill.py`` (decoupled, progressive, dynamic) and plain click
training from scratch (``direct``, the baseline). The student's prompt encoder and mask decoder
have the teacher's sizes and PE switches, so every schedule starts from the teacher's decoder.

Every model is then scored on the same held-out synthetic volumes (seed 1234), one volume at a
time with 5 click rounds (click sampling seeded per volume), in eval mode. JSON lines: ``env``,
one ``model`` line per model (mean Dice after 1/3/5 clicks with its standard error, steps done),
then ``ranking`` (students by Dice after 5 clicks; ratios and paired differences vs ``direct``).

Toy scale on a CPU says little about the full-size GPU recipe: the models are ~10^5 parameters,
the budgets minutes of one CPU thread, one training seed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a bare checkout too

from fastsam3d.bench import environment, time_ms
from fastsam3d.registry import build_model
from fastsam3d.training.distill import SCHEDULES, Distiller
from fastsam3d.training.loop import Batch, BatchSource, LoopConfig, Objective, click_loss, run
from fastsam3d.training.losses import FEATURE_LOSSES
from fastsam3d.training.synthetic import SyntheticConfig

SIZE = 32
# Prompt side shared by teacher and student, in the teacher's (SAM-Med3D) convention, so the
# Distiller copies it exactly (decoupled needs that: it never trains the decoder).
PROMPT_SIDE: dict[str, Any] = {
    "img_size": SIZE,
    "patch_size": 8,  # a 4^3 token grid, 16^3 low-res masks
    "out_chans": 48,
    "prompt_embed_dim": 48,
    "mask_in_chans": 8,
    "decoder_heads": 2,
    "decoder_mlp_dim": 96,
    "iou_head_hidden_dim": 48,
    "num_point_embeddings": 2,  # the teacher has no box embeddings
    "swap_pe_axes": True,
    "duplicate_sine": True,
}
TEACHER: dict[str, Any] = {
    "embed_dim": 64,
    "depth": 6,
    "num_heads": 4,
    "window_size": 2,
    "global_attn_indexes": (2, 5),
    **PROMPT_SIDE,
}
STUDENT: dict[str, Any] = {
    "embed_dim": 32,
    "depth": 3,
    "num_heads": 2,
    "mlp_only_blocks": 1,
    "sparse_group": 2,
    **PROMPT_SIDE,
}
# Radii scaled to the 32^3 cube; targets of >= 200 voxels (smaller ones barely show in the
# 16^3 low-res mask, and a 2-minute teacher probe reached half the Dice with 40).
SYNTHETIC = SyntheticConfig(
    size=SIZE, structures=5, min_radius=2.0, max_radius=20.0, min_target_voxels=200,
    deform_voxels=2.0,
)  # fmt: skip
EVAL_SEED = 1234
ROUNDS = 5
CPU = torch.device("cpu")


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _encoder_ms(model: torch.nn.Module, repeats: int = 10) -> float:
    """Median CPU time of one image-encoder forward at batch 1 (ms)."""
    x = torch.randn(1, 1, SIZE, SIZE, SIZE)
    with torch.no_grad():
        return time_ms(lambda: model.image_encoder(x), CPU, repeats, warmup=1)["median_ms"]


def held_out(volumes: int) -> Batch:
    """The evaluation batch: ``volumes`` synthetic volumes (seed 1234), one target each."""
    return BatchSource(volumes, CPU, seed=EVAL_SEED, synthetic=SYNTHETIC).next()


def evaluate(model: torch.nn.Module, batch: Batch) -> dict[str, list[float]]:
    """Dice after 1, 3 and 5 clicks of every volume (``dice1``: list over volumes), each
    volume alone with its own click seed, so models are compared on paired samples."""
    model.eval()
    dice: dict[str, list[float]] = {f"dice{r}": [] for r in (1, 3, 5)}
    with torch.no_grad():
        for i in range(batch.image.shape[0]):
            one = Batch(
                batch.image[i : i + 1], batch.target[i : i + 1], batch.first_click[i : i + 1],
                torch.zeros(1, dtype=torch.long),
            )  # fmt: skip
            gen = torch.Generator().manual_seed(EVAL_SEED + i)
            _, metrics = click_loss(model, one, gen, rounds=ROUNDS)
            for key, values in dice.items():
                values.append(metrics[key])
    return dice


def _mean_sem(values: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean."""
    sem = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0
    return statistics.fmean(values), sem


def _train(
    model: torch.nn.Module,
    objective: Objective,
    minutes: float,
    args: argparse.Namespace,
    seed: int,
    extra: torch.nn.Module | None,
    console: Console,
) -> dict[str, Any]:
    """Run the shared loop for ``minutes`` of wall clock (the time-driven schedule spans
    exactly that, so distillation phases play out inside it); returns the final state."""
    source = BatchSource(
        args.batch_size, CPU, seed=seed, synthetic=SYNTHETIC, pool_size=args.pool, refresh=1
    )
    cfg = LoopConfig(
        steps=10**9, batch_size=args.batch_size, lr=args.lr, max_minutes=minutes,
        schedule_minutes=minutes, save_every=10**9, log_every=100, seed=seed, device="cpu",
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as out:
        return run(model, objective, source, cfg, out, extra=extra, resume=False, console=console)


def _row(
    name: str,
    model: torch.nn.Module,
    state: dict[str, Any],
    dice: dict[str, list[float]],
) -> dict[str, Any]:
    """One ``model`` JSON line."""
    row: dict[str, Any] = {
        "kind": "model",
        "name": name,
        "arch": model.config.arch,
        "params": _params(model),
        "encoder_params": _params(model.image_encoder),
        "encoder_ms_b1": round(_encoder_ms(model), 3),
        "steps": state["step"],
        "train_s": round(state["elapsed_s"], 1),
        "load_avg": round(os.getloadavg()[0], 2),
        "volumes": len(dice["dice1"]),
    }
    for key, values in dice.items():
        mean, sem = _mean_sem(values)
        row[key], row[f"{key}_sem"] = round(mean, 4), round(sem, 4)
    return row


def _ranking(students: dict[str, dict[str, list[float]]]) -> dict[str, Any]:
    """Students ordered by mean Dice after 5 clicks; ratios and paired differences vs direct."""
    base = students["direct"]
    vs_direct: dict[str, dict[str, float]] = {}
    for name, dice in students.items():
        vs_direct[name] = {}
        for key in ("dice1", "dice3", "dice5"):
            diff, sem = _mean_sem([a - b for a, b in zip(dice[key], base[key])])
            ratio = statistics.fmean(dice[key]) / max(statistics.fmean(base[key]), 1e-9)
            vs_direct[name].update(
                {f"{key}_ratio": round(ratio, 3), f"{key}_diff": round(diff, 4),
                 f"{key}_diff_sem": round(sem, 4)}
            )  # fmt: skip
    order = sorted(students, key=lambda n: statistics.fmean(students[n]["dice5"]), reverse=True)
    return {"kind": "ranking", "by": "dice5", "order": order, "vs_direct": vs_direct}


def compare(args: argparse.Namespace, console: Console) -> Iterator[dict[str, Any]]:
    """Train the teacher, then the student with each schedule and directly; yield JSON rows."""
    torch.manual_seed(0)
    teacher = build_model("sam_med3d", **TEACHER)
    teacher_gen = torch.Generator().manual_seed(0)
    state = _train(
        teacher, lambda b, p: click_loss(teacher, b, teacher_gen, ROUNDS),
        args.teacher_minutes, args, 0, None, console,
    )  # fmt: skip
    held = held_out(args.eval_volumes)
    students: dict[str, dict[str, list[float]]] = {}
    yield _row("teacher", teacher, state, evaluate(teacher, held))
    runs = [("direct", "")] + [(s, f) for s in args.schedules for f in args.feature_loss]
    for schedule, feature in runs:
        name = schedule if len(args.feature_loss) == 1 or not feature else f"{schedule}-{feature}"
        torch.manual_seed(1)  # the same initial student every time
        student = build_model("fastsam3d_dilated", **STUDENT)
        if schedule == "direct":
            gen = torch.Generator().manual_seed(0)
            objective: Objective = lambda b, p, s=student, g=gen: click_loss(s, b, g, ROUNDS)
            extra = None
        else:
            extra = Distiller(student, teacher, schedule, rounds=ROUNDS, feature=feature)
            objective = extra.objective
        state = _train(student, objective, args.student_minutes, args, 1, extra, console)
        students[name] = evaluate(student, held)
        yield _row(name, student, state, students[name])
    yield _ranking(students)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--teacher-minutes", type=float, default=5.0)
    ap.add_argument("--student-minutes", type=float, default=3.0, help="per student")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--pool", type=int, default=64, help="synthetic volumes kept, 1 new per step")
    ap.add_argument("--eval-volumes", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--schedules", nargs="+", choices=SCHEDULES, default=list(SCHEDULES))
    ap.add_argument(
        "--feature-loss", nargs="+", choices=FEATURE_LOSSES, default=["mse"],
        help="one run per schedule and loss (rows named schedule-loss when several)",
    )  # fmt: skip
    return ap.parse_args(argv)


def main() -> None:
    """Run the comparison and print JSON lines (training logs go to stderr)."""
    args = parse_args()
    torch.set_num_threads(args.threads)
    print(json.dumps({**environment(CPU), "scale": "CPU toy scale", "args": vars(args)}))
    for row in compare(args, Console(stderr=True)):
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
