"""Training on CPU with tiny models: synthetic data, click loop, resume, distillation, CLI."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from fastsam3d.errors import FastSAM3DError
from fastsam3d.registry import build_model
from fastsam3d.training.distill import SCHEDULES, Distiller, layer_map, layer_weights
from fastsam3d.training.loop import (
    BatchSource,
    LoopConfig,
    click_loss,
    jittered_boxes,
    lr_factor,
    run,
)
from fastsam3d.training.losses import feature_loss
from fastsam3d.training.synthetic import SyntheticConfig, generate

SIZE = 32
TINY = {
    "img_size": SIZE,
    "embed_dim": 32,
    "depth": 3,
    "num_heads": 2,
    "out_chans": 32,
    "prompt_embed_dim": 32,
    "decoder_mlp_dim": 64,
    "iou_head_hidden_dim": 32,
    "sparse_group": 2,
    "mlp_only_blocks": 1,
}
SYN = SyntheticConfig(size=SIZE, structures=4, min_target_voxels=20)


def _tiny(**extra: object) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("fastsam3d_dilated", **{**TINY, **extra})


def _source(batch: int = 4, seed: int = 0) -> BatchSource:
    return BatchSource(batch, torch.device("cpu"), seed=seed, synthetic=SYN)


def test_synthetic_is_deterministic_under_a_seed() -> None:
    a = generate(3, torch.Generator().manual_seed(7), SYN)
    b = generate(3, torch.Generator().manual_seed(7), SYN)
    c = generate(3, torch.Generator().manual_seed(8), SYN)
    assert torch.equal(a.image, b.image) and torch.equal(a.labels, b.labels)
    assert torch.equal(a.target, b.target)
    assert not torch.equal(a.image, c.image)
    assert a.image.shape == (3, 1, SIZE, SIZE, SIZE) and a.labels.dtype == torch.uint8
    for i in range(3):  # the target is exactly one labelled structure, and it is present
        assert torch.equal(a.target[i, 0], a.labels[i] == a.target_id[i])
        assert a.target[i].sum() > 0
    assert all(len(torch.unique(lab)) >= 3 for lab in a.labels)  # several structures


def test_synthetic_planes_separate_touching_structures() -> None:
    """With planes=1 no two structures touch (a background plane lies between them), the
    volume is still full of structures, and the target is still one whole label."""
    from dataclasses import replace

    batch = generate(3, torch.Generator().manual_seed(7), replace(SYN, structures=8, planes=1.0))
    lab = batch.labels.long()
    for d in (1, 2, 3):
        hi, lo = lab.narrow(d, 1, SIZE - 1), lab.narrow(d, 0, SIZE - 1)
        assert not ((hi != lo) & (hi > 0) & (lo > 0)).any()
    assert all(len(torch.unique(x)) >= 3 for x in batch.labels)
    for i in range(3):
        assert torch.equal(batch.target[i, 0], batch.labels[i] == batch.target_id[i])


def test_boxes_enclose_the_target_up_to_jitter() -> None:
    target = torch.zeros(2, 1, SIZE, SIZE, SIZE, dtype=torch.bool)
    target[0, 0, 4:10, 5:20, 8:9] = True
    target[1, 0, 20:31, 0:3, 10:30] = True
    boxes = jittered_boxes(target, torch.Generator().manual_seed(0))
    assert boxes.shape == (2, 2, 3)
    exact = torch.tensor([[[4, 5, 8], [9, 19, 8]], [[20, 0, 10], [30, 2, 29]]], dtype=torch.float)
    extent = (exact[:, 1] - exact[:, 0]).clamp_min(1)
    assert ((boxes - exact).abs() <= (0.1 * extent + 2)[:, None]).all()


def test_lr_schedule_warms_up_and_decays() -> None:
    assert lr_factor(0.0, 0.1, 0.05) < lr_factor(0.05, 0.1, 0.05) < lr_factor(0.1, 0.1, 0.05)
    assert lr_factor(0.1, 0.1, 0.05) == pytest.approx(1.0)
    assert lr_factor(1.0, 0.1, 0.05) == pytest.approx(0.05)


class _OneBatch(BatchSource):
    """A real BatchSource that serves the same synthetic batch every step (overfitting test)."""

    def __init__(self, batch: int) -> None:
        super().__init__(batch, torch.device("cpu"), seed=123, synthetic=SYN)
        self.fixed = super().next()

    def next(self):
        return self.fixed


@pytest.mark.slow
def test_click_training_lowers_the_loss(tmp_path: Path) -> None:
    model = _tiny()
    source = _OneBatch(2)
    held = source.fixed

    def held_loss() -> float:
        model.eval()
        with torch.no_grad():
            loss, _ = click_loss(model, held, torch.Generator().manual_seed(0), rounds=2)
        model.train()
        return loss.item()

    before = held_loss()
    gen = torch.Generator().manual_seed(1)
    cfg = LoopConfig(steps=30, batch_size=2, lr=3e-3, save_every=100, log_every=100)
    run(model, lambda b, p: click_loss(model, b, gen, 2, box_prob=0.3), source, cfg, tmp_path)
    after = held_loss()
    assert after < 0.8 * before, (before, after)


def test_resumed_run_continues_from_its_step(tmp_path: Path) -> None:
    model = _tiny()
    gen = torch.Generator().manual_seed(1)

    def objective(b, p):
        return click_loss(model, b, gen, 2)

    cfg = LoopConfig(steps=3, batch_size=2, save_every=1, log_every=100)
    run(model, objective, _source(2), cfg, tmp_path)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    fresh = _tiny()  # a new process would start from new weights; resume must load them
    gen2 = torch.Generator().manual_seed(1)
    cfg.steps = 5
    state = run(fresh, lambda b, p: click_loss(fresh, b, gen2, 2), _source(2), cfg, tmp_path)
    assert state["step"] == 5
    rows = list(csv.DictReader((tmp_path / "log.csv").open()))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5]
    assert any(not torch.equal(saved[k], v) for k, v in fresh.state_dict().items())
    assert json.loads((tmp_path / "state.json").read_text())["step"] == 5
    reloaded = build_model(checkpoint=tmp_path / "model.safetensors")
    for k, v in reloaded.state_dict().items():
        assert torch.equal(v, fresh.state_dict()[k])


def test_run_spent_in_the_first_validation_still_saves(tmp_path: Path) -> None:
    """A budget used up by the step-0 validation (a slow CPU) leaves weights and a state to
    resume from, not a "done" that names a file never written."""
    model = _tiny()

    def slow_validation(m: torch.nn.Module) -> dict[str, float]:
        time.sleep(0.05)
        return {"score": 0.5}

    cfg = LoopConfig(steps=3, batch_size=2, max_minutes=1e-4, log_every=100)
    state = run(model, lambda b, p: click_loss(model, b, torch.Generator(), 2), _source(2), cfg,
                tmp_path, validate=slow_validation)  # fmt: skip
    assert state["step"] == 0 and state["best"] == {"step": 0, "score": 0.5}
    assert json.loads((tmp_path / "state.json").read_text())["step"] == 0
    assert (tmp_path / "model.safetensors").exists() and (tmp_path / "best.safetensors").exists()


def test_layer_schedules() -> None:
    assert layer_map(6, 12) == [1, 3, 5, 7, 9, 11]
    assert layer_map(3, 3) == [0, 1, 2]
    assert layer_weights("progressive", 0.0, 6) == [1, 0, 0, 0, 0, 0]
    assert layer_weights("progressive", 0.59, 6) == [1] * 6
    assert layer_weights("progressive", 0.7, 6) == [0] * 6
    early, late = layer_weights("dynamic", 0.05, 6), layer_weights("dynamic", 0.8, 6)
    assert early.index(max(early)) == 0 and late.index(max(late)) == 5
    assert sum(early) == pytest.approx(1.0)
    assert layer_weights("decoupled", 0.5, 6) == [0] * 6


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_distillation_lowers_the_feature_loss(schedule: str, tmp_path: Path) -> None:
    teacher = _tiny(embed_dim=48, depth=4, out_chans=32)
    student = _tiny(embed_dim=24, depth=2)
    distiller = Distiller(student, teacher, schedule, rounds=2)
    source = _OneBatch(2)
    held = source.fixed
    with torch.no_grad():  # the teacher's decoder is copied into the student when it fits
        assert torch.equal(
            student.mask_decoder.iou_token.weight, teacher.mask_decoder.iou_token.weight
        )
        before, _ = distiller.objective(held, 0.7 if schedule != "decoupled" else 0.0)
    cfg = LoopConfig(steps=8, batch_size=2, lr=1e-3, save_every=100, log_every=100)
    run(student, lambda b, p: distiller.objective(b, 0.7 if schedule != "decoupled" else p),
        source, cfg, tmp_path, extra=distiller)  # fmt: skip
    with torch.no_grad():
        after, _ = distiller.objective(held, 0.7 if schedule != "decoupled" else 0.0)
    assert after < before
    if schedule != "decoupled":  # the end-to-end phase runs the click loop
        loss, metrics = distiller.objective(held, 0.95)
        assert "dice2" in metrics and torch.isfinite(loss)
    assert (tmp_path / "extra.safetensors").exists()  # the width projections


def test_relative_feature_loss_weighs_layers_alike() -> None:
    """The relative distillation loss is scale-free: a zero student scores 1 against any
    teacher, and scaling both feature maps (a deep layer's larger residual stream) changes
    nothing; raw MSE grows with the square of the scale."""
    torch.manual_seed(0)
    teacher, student = torch.randn(2, 8, 4, 4, 4), torch.randn(2, 8, 4, 4, 4)
    zero = torch.zeros_like(teacher)
    assert feature_loss(zero, 300 * teacher, "relative").item() == pytest.approx(1.0)
    assert feature_loss(300 * student, 300 * teacher, "relative").item() == pytest.approx(
        feature_loss(student, teacher, "relative").item(), rel=1e-5
    )
    raw = feature_loss(300 * student, 300 * teacher, "mse")
    assert raw.item() == pytest.approx(9e4 * feature_loss(student, teacher, "mse").item(), rel=1e-5)
    with pytest.raises(FastSAM3DError, match="feature loss"):
        Distiller(_tiny(), _tiny(), "progressive", feature="cosine")


def test_decoupled_needs_the_teachers_exact_decoder() -> None:
    """Decoupled never trains the prompt encoder / decoder: a student whose copy would differ
    (here SAM-Med3D's duplicated sine and swapped PE axes, no box embeddings) is refused."""
    torch.manual_seed(0)
    teacher = build_model("sam_med3d", **{**TINY, "prompt_embed_dim": 48, "out_chans": 48})
    student = _tiny(prompt_embed_dim=48, out_chans=48)
    with pytest.raises(FastSAM3DError, match="duplicate_sine"):
        Distiller(student, teacher, "decoupled")
    Distiller(student, teacher, "progressive")  # the others fine-tune it end to end
    matching = _tiny(prompt_embed_dim=48, out_chans=48, duplicate_sine=True, swap_pe_axes=True,
                     num_point_embeddings=2)  # fmt: skip
    Distiller(matching, teacher, "decoupled")
    assert torch.equal(
        matching.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix,
        teacher.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix,
    )


def test_cli_train_and_models(tmp_path: Path) -> None:
    from fastsam3d.cli import app

    runner = CliRunner()
    sets = [arg for k, v in TINY.items() for arg in ("--set", f"{k}={v}")]
    out = tmp_path / "run"
    args = ["train", "--out", str(out), *sets, "--steps", "2", "--batch-size", "2", "--rounds", "2"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert (out / "model.safetensors").exists()
    again = runner.invoke(app, args)
    assert again.exit_code == 1 and "--resume" in again.output
    resumed = runner.invoke(app, [*args[:-4], "--steps", "3", "--resume", "--rounds", "2"])
    assert resumed.exit_code == 0, resumed.output
    assert json.loads((out / "state.json").read_text())["step"] == 3
    listing = runner.invoke(app, ["models"])
    assert listing.exit_code == 0 and "fastsam3d_dilated" in listing.output


def test_snapshots_and_their_mean(tmp_path: Path) -> None:
    """--keep-every keeps the start and every Nth step's weights; `convert --mean-with`
    averages checkpoints (a model soup); a bad --real-scale is refused before any write."""
    from fastsam3d.cli import app

    runner = CliRunner()
    sets = [arg for k, v in TINY.items() for arg in ("--set", f"{k}={v}")]
    base = ["train", *sets, "--steps", "2", "--batch-size", "2", "--rounds", "1"]
    out = tmp_path / "run"
    result = runner.invoke(app, [*base, "--out", str(out), "--keep-every", "1"])
    assert result.exit_code == 0, result.output
    snaps = sorted(p.name for p in (out / "snapshots").iterdir())
    assert snaps == [f"step_00000{s}.safetensors" for s in range(3)]
    first, last = (out / "snapshots" / snaps[i] for i in (0, -1))
    mean = tmp_path / "mean.safetensors"
    result = runner.invoke(app, ["convert", str(first), str(mean), "--mean-with", str(last)])
    assert result.exit_code == 0 and "mean of 2 checkpoints" in result.output, result.output
    a, b, m = (load_file(p) for p in (first, last, mean))
    key = "mask_decoder.iou_token.weight"
    assert not torch.equal(a[key], b[key]) and torch.allclose(m[key], (a[key] + b[key]) / 2)
    other = tmp_path / "other"
    wider = [
        *base[: base.index("embed_dim=32")],
        "embed_dim=16",
        *base[base.index("embed_dim=32") + 1 :],
    ]
    assert runner.invoke(app, [*wider, "--out", str(other)]).exit_code == 0
    refused = runner.invoke(
        app, ["convert", str(first), str(mean), "--overwrite", "--mean-with", str(other / "model.safetensors")]
    )  # fmt: skip
    assert refused.exit_code == 1 and "cannot average different models" in refused.output
    for bad in ("2", "1.5,0.5", "0,1"):
        refused = runner.invoke(app, [*base, "--out", str(tmp_path / "bad"), "--real-scale", bad])
        assert refused.exit_code == 2 and "--real-scale" in refused.output, refused.output
        assert not (tmp_path / "bad").exists()


def test_cli_synthetic_settings(tmp_path: Path) -> None:
    """--synthetic KEY=VALUE reaches the generator and the run's recipe; unknown keys and
    wrong types are refused before anything is written."""
    from fastsam3d.cli import app

    runner = CliRunner()
    sets = [arg for k, v in TINY.items() for arg in ("--set", f"{k}={v}")]
    base = ["train", *sets, "--steps", "1", "--batch-size", "2", "--rounds", "1"]
    out = tmp_path / "run"
    synth = ["--synthetic", "structures=3", "--synthetic", "min_radius=2", "--synthetic",
             "ct_fraction=1.0"]  # fmt: skip
    result = runner.invoke(app, [*base, "--out", str(out), *synth])
    assert result.exit_code == 0, result.output
    recorded = json.loads((out / "state.json").read_text())["loop"]["extra"]["synthetic"]
    assert recorded == {"structures": 3, "min_radius": 2.0, "ct_fraction": 1.0}
    for bad, message in [
        ("bogus=1", "no setting 'bogus'"),
        ("structures=many", "structures: expected int"),
    ]:
        refused = runner.invoke(app, [*base, "--out", str(tmp_path / "bad"), "--synthetic", bad])
        assert refused.exit_code == 2 and message in refused.output, refused.output
        assert not (tmp_path / "bad").exists()


def _nifti_case(folder: Path) -> None:
    """A 40^3 volume at 2 mm with two touching boxes as labels 1 and 2 (NIfTI pair)."""
    import nibabel as nib
    import numpy as np

    folder.mkdir(parents=True)
    label = np.zeros((40, 40, 40), np.uint8)
    label[10:25, 10:30, 12:28] = 1
    label[25:34, 10:30, 12:28] = 2
    image = (100 + 50 * label + np.random.default_rng(0).normal(0, 5, label.shape)).astype("f4")
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    nib.save(nib.Nifti1Image(image, affine), folder / "image.nii.gz")
    nib.save(nib.Nifti1Image(label, affine), folder / "label.nii.gz")


@pytest.mark.slow
def test_cli_finetune_on_nifti_and_distill(tmp_path: Path) -> None:
    from fastsam3d.cli import app
    from fastsam3d.training.data import find_pairs, prepare_cases

    _nifti_case(tmp_path / "data" / "case1")
    cases = prepare_cases([tmp_path / "data"])
    assert find_pairs(tmp_path / "data")[0][0] == "case1"
    assert sorted(cases[0].objects) == [1, 2]
    runner = CliRunner()
    sets = [arg for k, v in TINY.items() for arg in ("--set", f"{k}={v}")]
    base = ["--steps", "2", "--batch-size", "2", "--rounds", "2"]
    teacher = tmp_path / "t"
    assert runner.invoke(app, ["train", "--out", str(teacher), *sets, *base]).exit_code == 0
    tuned = runner.invoke(
        app,
        ["finetune", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "ft"),
         "--from", str(teacher / "model.safetensors"), *base],
    )  # fmt: skip
    assert tuned.exit_code == 0, tuned.output
    state = json.loads((tmp_path / "ft" / "state.json").read_text())
    assert state["loop"]["extra"]["real_cases"] == ["case1"]
    frozen = runner.invoke(
        app,
        ["finetune", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "fz"),
         "--from", str(teacher / "model.safetensors"), "--freeze-encoder", *base],
    )  # fmt: skip
    assert frozen.exit_code == 0, frozen.output
    start = load_file(teacher / "model.safetensors")
    after = load_file(tmp_path / "fz" / "model.safetensors")
    moved = {k.split(".")[0] for k in start if not torch.equal(start[k], after[k])}
    assert moved and "image_encoder" not in moved  # only the prompt side trained
    small = [
        *sets[: sets.index("embed_dim=32")],
        "embed_dim=16",
        *sets[sets.index("embed_dim=32") + 1 :],
    ]
    distilled = runner.invoke(
        app,
        ["distill", "--teacher", str(teacher / "model.safetensors"), "--out", str(tmp_path / "d"),
         *small, "--schedule", "dynamic", "--feature-loss", "relative", *base],
    )  # fmt: skip
    assert distilled.exit_code == 0, distilled.output
    assert (tmp_path / "d" / "extra.safetensors").exists()
    state = json.loads((tmp_path / "d" / "state.json").read_text())
    assert state["loop"]["extra"]["feature_loss"] == "relative"


def test_batches_carry_several_targets_per_image_and_reuse_a_pool() -> None:
    source = BatchSource(3, torch.device("cpu"), seed=0, synthetic=SYN, targets_per_image=2,
                         pool_size=5, refresh=1)  # fmt: skip
    batch = source.next()
    assert batch.image.shape == (3, 1, SIZE, SIZE, SIZE)
    assert batch.target.shape == (6, 1, SIZE, SIZE, SIZE)
    assert batch.image_index.tolist() == [0, 0, 1, 1, 2, 2]
    assert bool(batch.target.flatten(1).any(1).all())  # every target is present
    inside = (batch.first_click >= 0).all(1)
    for t in inside.nonzero()[:, 0].tolist():  # given first clicks lie on their target
        d, h, w = batch.first_click[t].tolist()
        assert batch.target[t, 0, d, h, w]
    model = _tiny()
    loss, metrics = click_loss(model, batch, torch.Generator().manual_seed(0), rounds=2)
    loss.backward()
    assert torch.isfinite(loss) and "dice2" in metrics


def test_validation_keeps_the_best_checkpoint(tmp_path: Path) -> None:
    """--val-cases scores the model on held-out real objects (val.csv: Dice after each click and
    from a box) and keeps the best-scoring weights; the validator is deterministic."""
    from fastsam3d.cli import app
    from fastsam3d.training.data import load_cases
    from fastsam3d.training.validate import CropValidator

    _nifti_case(tmp_path / "data" / "case1")
    runner = CliRunner()
    sets = [arg for k, v in TINY.items() for arg in ("--set", f"{k}={v}")]
    cases = tmp_path / "val.safetensors"
    prep = ["train", "--out", str(tmp_path / "prep"), "--data", str(tmp_path / "data"),
            "--save-cases", str(cases), "--steps", "0"]  # fmt: skip
    assert runner.invoke(app, prep).exit_code == 0
    out = tmp_path / "run"
    args = ["train", "--out", str(out), *sets, "--steps", "4", "--batch-size", "2",
            "--rounds", "2", "--val-cases", str(cases), "--val-every", "2"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader((out / "val.csv").open()))
    assert [int(r["step"]) for r in rows] == [0, 2, 4]
    assert {"dice1", "dice5", "box_dice1", "box_dice5", "score"} <= set(rows[0])
    scores = [float(r["score"]) for r in rows]
    assert all(0.0 <= s <= 1.0 for s in scores)
    best = json.loads((out / "state.json").read_text())["best"]
    assert best["score"] == pytest.approx(max(scores), abs=1e-5)
    assert best["step"] == [0, 2, 4][scores.index(max(scores))]
    longer = [*args, "--resume"]
    longer[longer.index("--steps") + 1] = "6"
    resumed = runner.invoke(app, longer)  # the best so far survives the resume
    assert resumed.exit_code == 0, resumed.output
    rows = list(csv.DictReader((out / "val.csv").open()))
    assert [int(r["step"]) for r in rows] == [0, 2, 4, 6]
    scores = [float(r["score"]) for r in rows]
    best = json.loads((out / "state.json").read_text())["best"]
    assert best["score"] == pytest.approx(max(scores), abs=1e-5)
    elsewhere = [*args[:-4], "--val-cases", str(tmp_path / "nope.safetensors")]
    elsewhere[2] = str(tmp_path / "never")
    missing = runner.invoke(app, elsewhere)
    assert missing.exit_code == 1 and "no such prepared-cases file" in missing.output
    foreign = tmp_path / "weights.safetensors"  # a safetensors file, but not prepared cases
    foreign.write_bytes((out / "model.safetensors").read_bytes())
    elsewhere[-1] = str(foreign)
    wrong = runner.invoke(app, elsewhere)
    assert wrong.exit_code == 1 and "not a prepared-cases file" in wrong.output
    assert not (tmp_path / "never").exists()
    model = build_model(checkpoint=out / "best.safetensors")
    validator = CropValidator(load_cases(cases), size=SIZE)
    assert len(validator) == 2  # labels 1 and 2
    first, again = validator(model), validator(model)
    assert first == again and first["score"] == pytest.approx(best["score"], abs=0.02)


def test_multimask_first_click_starts_from_the_single_output_and_trains_the_best() -> None:
    from fastsam3d.training.loop import start_multimask_from_single
    from fastsam3d.training.losses import dice_ce_loss, dice_ce_per_mask

    model = _tiny(num_point_embeddings=4)
    batch = _source(2).next()
    emb = model.image_encoder(batch.image)[batch.image_index]
    pe = model.prompt_encoder.get_dense_pe()
    click = (torch.full((len(emb), 1, 3), SIZE / 2), torch.ones(len(emb), 1, dtype=torch.long))
    sparse, dense = model.prompt_encoder(points=click, boxes=None, masks=None)
    before, _ = model.mask_decoder(emb, pe, sparse, dense, False)
    start_multimask_from_single(model)
    assert model.config.first_click_multimask
    logits, iou = model.mask_decoder(emb, pe, sparse, dense, False, outputs=range(4))
    torch.testing.assert_close(logits[:, :1], before)  # the single output is unchanged
    assert (iou == iou[:, :1]).all()  # and, the IoUs tied, still the answer (argmax: first)
    up = torch.rand(3, 2, 4, 4, 4) * 4 - 2
    target = torch.rand(3, 1, 4, 4, 4) > 0.5
    per_mask = dice_ce_per_mask(up, target)
    assert per_mask.shape == (3, 2)
    torch.testing.assert_close(dice_ce_loss(up[:, :1], target), per_mask[:, 0].mean())

    # the first round decodes all four outputs; gradient reaches only the best multimask one
    model.zero_grad()
    loss, metrics = click_loss(model, batch, torch.Generator().manual_seed(0), rounds=1)
    loss.backward()
    mlps = model.mask_decoder.output_hypernetworks_mlps
    moved = [
        any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters()) for m in mlps
    ]
    assert moved[0] and sum(moved[1:]) >= 1, moved
    assert 0 <= metrics["dice1"] <= 1


def test_dice_ce_is_monais_with_its_gradient_in_closed_form(monkeypatch) -> None:
    """The fused loss is MONAI's DiceCELoss(sigmoid, squared_pred), as SAM-Med3D trains with it,
    per mask; its closed-form gradient matches autograd's, also over several CPU slices."""
    from monai.losses import DiceCELoss

    from fastsam3d.training import losses

    monkeypatch.setattr(losses, "CPU_LOSS_CHUNK", 64)  # 1,000 voxels: 16 slices
    torch.manual_seed(0)
    logits = (torch.randn(3, 2, 10, 10, 10) * 3).requires_grad_()
    target = torch.rand(3, 1, 10, 10, 10) > 0.6
    per_mask = losses.dice_ce_per_mask(logits, target)
    for c in range(2):
        monai = DiceCELoss(sigmoid=True, squared_pred=True)(logits[:, c : c + 1], target.float())
        torch.testing.assert_close(per_mask[:, c].mean(), monai)
    weights = torch.rand(3, 2)
    (grad,) = torch.autograd.grad((per_mask * weights).sum(), logits)
    prob = logits.sigmoid()
    t = target.float()
    plain = (
        1
        - (2 * (prob * t).sum((2, 3, 4)) + 1e-5)
        / (prob.square().sum((2, 3, 4)) + t.sum((2, 3, 4)) + 1e-5)
        + torch.nn.functional.binary_cross_entropy_with_logits(
            logits, t.expand_as(logits), reduction="none"
        ).mean((2, 3, 4))
    )
    (expected,) = torch.autograd.grad((plain * weights).sum(), logits)
    torch.testing.assert_close(grad, expected)


def test_real_crops_and_validation_use_the_models_crop_spacing(tmp_path: Path) -> None:
    """A model with ``crop_spacing_mm`` trains and is judged on real crops of that spacing: an
    object takes (1.5 / 1.0)^3 as many voxels in a 1.0 mm crop as in a 1.5 mm one."""
    from fastsam3d.training.data import RealCropSampler, prepare_cases
    from fastsam3d.training.validate import CropValidator

    _nifti_case(tmp_path / "data" / "case1")
    cases = prepare_cases([tmp_path / "data"])
    coarse, fine = (CropValidator(cases, size=64, spacing=s) for s in (1.5, 1.0))
    ratio = fine.targets[0].sum().item() / coarse.targets[0].sum().item()
    assert ratio == pytest.approx(1.5**3, rel=0.1)  # label 1, 30 x 40 x 32 mm, fits both
    source = BatchSource(2, torch.device("cpu"), cases=cases, synthetic=SYN, crop_spacing=1.0)
    assert source.real.spacing == 1.0
    # --real-scale: a zoom of 1.3 shows an object 1.3^3 times as large as a zoom of 1.0
    voxels = {}
    for zoom in (1.0, 1.3):
        sampler = RealCropSampler(cases, seed=0, size=64, spacing=1.5, scale=(zoom, zoom))
        voxels[zoom] = sum(sampler.sample(1)[1].sum().item() for _ in range(3))
    assert voxels[1.3] / voxels[1.0] == pytest.approx(1.3**3, rel=0.15)
