"""Simulated-click evaluation: the library protocol, the baseline, and ``fastsam3d evaluate``."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from _cli_data import run_cli, tiny_model, tiny_model_file, write_phantom

from fastsam3d.errors import OutputExistsError, VolumeError
from fastsam3d.evaluate import (
    RegionGrowing,
    dice_nsd,
    evaluate_case,
    pair_cases,
    simulate_click,
    summarize,
    write_report,
)
from fastsam3d.sample_data import make_phantom


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(shape=(40, 40, 32), spacing=(1.5, 1.5, 2.0))


def test_metrics_from_monai(phantom):
    _, label = phantom
    gt = label == 1
    assert dice_nsd(gt, gt, np.array([1.5, 1.5, 2.0]), 2.0) == (1.0, 1.0)
    shifted = np.roll(gt, 1, axis=0)  # 1.5 mm shift: inside a 2 mm tolerance, not a 1 mm one
    dice, nsd = dice_nsd(shifted, gt, np.array([1.5, 1.5, 2.0]), 2.0)
    assert 0.7 < dice < 1.0 and nsd == pytest.approx(1.0)
    assert dice_nsd(shifted, gt, np.array([1.5, 1.5, 2.0]), 1.0)[1] < 1.0
    assert dice_nsd(np.zeros_like(gt), gt, np.array([1.5, 1.5, 2.0]), 2.0) == (0.0, 0.0)
    from monai.metrics import compute_dice

    as_tensor = [torch.from_numpy(m)[None, None].float() for m in (shifted, gt)]
    assert dice == pytest.approx(float(compute_dice(*as_tensor)[0, 0]), abs=1e-6)
    alone = dice_nsd(shifted, gt, np.array([1.5, 1.5, 2.0]), None)  # Dice only: no MONAI
    assert alone[0] == dice and np.isnan(alone[1])


def test_clicks_follow_the_rules_and_seed(phantom):
    import torch

    _, label = phantom
    gt = label == 1
    empty = np.zeros_like(gt)
    point, positive = simulate_click(empty, gt, "ritm", torch.Generator().manual_seed(1))
    assert positive and gt[tuple(point)]
    again, _ = simulate_click(empty, gt, "ritm", torch.Generator().manual_seed(1))
    np.testing.assert_array_equal(point, again)
    # the prediction covers the object and a neighbour: the click removes the false positive
    point, positive = simulate_click(
        gt | (label == 2), gt, "ritm", torch.Generator().manual_seed(1)
    )
    assert not positive and label[tuple(point)] == 2


def test_baseline_region_growing_on_phantom(phantom):
    volume, label = phantom
    grower = RegionGrowing(volume)
    gt = label == 1
    seed = np.argwhere(gt).mean(0).round().astype(int)
    assert gt[tuple(seed)]
    grown = grower.segment([(seed, True)])
    assert dice_nsd(grown, gt, volume.spacing, 2.0)[0] > 0.8
    # a negative click inside the object cuts away the part nearer to it
    far = np.argwhere(gt)[np.argmax(np.linalg.norm(np.argwhere(gt) - seed, axis=1))]
    cut = grower.segment([(seed, True), (far, False)])
    assert cut.sum() < grown.sum() and not cut[tuple(far)]
    assert not grower.segment([(far, False)]).any()
    # from a box, a negative click cuts only its side: the box centre keeps the rest
    box = (np.argwhere(gt).min(0), np.argwhere(gt).max(0))
    boxed = grower.segment([], box=box)
    cut = grower.segment([(far, False)], box=box)
    assert 0 < cut.sum() < boxed.sum() and not cut[tuple(far)]


def test_evaluate_case_rows_model_beside_baseline(phantom):
    from fastsam3d.session import Session

    volume, label = phantom
    session = Session(tiny_model(), device="cpu")
    rows = evaluate_case(session, volume, label, [1, 2], n_clicks=2, box=True, case="p")
    protocols = {(r.label, r.protocol, r.method) for r in rows}
    assert protocols == {
        (lid, p, m)
        for lid in (1, 2)
        for p in ("clicks", "box+clicks")
        for m in ("model", "baseline")
    }
    clicks = [r for r in rows if r.protocol == "clicks" and r.label == 1]
    assert [r.step for r in clicks] == [1, 1, 2, 2]
    model, base = clicks[0], clicks[1]
    assert (model.i, model.j, model.k) == (base.i, base.j, base.k)  # the very same clicks
    assert all(0 <= r.dice <= 1 and 0 <= r.nsd <= 1 for r in rows)
    box = [r for r in rows if r.protocol == "box+clicks" and r.label == 1]
    assert len(box) == 2 * 6 and box[0].clicks == 0 and box[0].i == -1  # box, then 5 clicks
    again = evaluate_case(session, volume, label, [1], n_clicks=2, box=False, case="p")
    assert [(r.i, r.j, r.k, r.dice) for r in again] == [(r.i, r.j, r.k, r.dice) for r in clicks]
    with pytest.raises(VolumeError, match="does not match"):
        evaluate_case(session, volume, label[:-1], [1])
    summary = summarize(rows)
    assert {s["method"] for s in summary} == {"model", "baseline"}


def test_report_files_and_refusal(tmp_path: Path, phantom):
    from fastsam3d.evaluate import Row

    rows = [
        Row("c", 1, "clicks", m, s, s, 0.5 + 0.1 * s, 0.4, 0.01, 1, 2, 3, True)
        for s in (1, 2) for m in ("model", "baseline")
    ]  # fmt: skip
    paths = write_report(rows, tmp_path / "rep")
    assert paths["dice_vs_clicks.png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(OutputExistsError):
        write_report(rows, tmp_path / "rep")
    write_report(rows, tmp_path / "rep", overwrite=True)


def test_pair_cases(tmp_path: Path):
    for name in ("a", "b"):
        write_phantom(tmp_path / "img", name, label_folder=tmp_path / "lab")
    assert [c[0] for c in pair_cases(tmp_path / "img", tmp_path / "lab")] == ["a", "b"]
    (tmp_path / "lab" / "b.nii.gz").unlink()
    with pytest.raises(VolumeError, match="image case 'b'.*has no label"):
        pair_cases(tmp_path / "img", tmp_path / "lab")


@pytest.mark.slow
def test_evaluate_cli_csv_png_baseline(tmp_path: Path):
    image, label = write_phantom(tmp_path, "ph")
    model = tiny_model_file(tmp_path)
    out = tmp_path / "report"
    run = run_cli(
        "evaluate", image, label, "-o", out, "--clicks", "3", "--labels", "1,3",
        "--model", model, "--no-box", "--json",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert {s["method"] for s in report["summary"]} == {"model", "baseline"}
    with open(out / "results.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2 * 3 * 2  # labels x clicks x methods
    assert {r["method"] for r in rows} == {"model", "baseline"}
    assert (out / "summary.csv").exists()
    assert (out / "dice_vs_clicks.png").stat().st_size > 1000
    table = run_cli("evaluate", image, label, "-o", out, "--model", model)
    assert table.returncode == 1 and "already exists" in table.stderr


def test_evaluate_cli_single_crop_option(tmp_path: Path):
    """--max-tiles 0 measures the model on one crop per click; a negative count is refused."""
    image, label = write_phantom(tmp_path, "ph")
    model = tiny_model_file(tmp_path)
    common = ("--clicks", "1", "--labels", "1", "--model", model, "--no-box", "--no-baseline")
    run = run_cli("evaluate", image, label, "-o", tmp_path / "r0", "--max-tiles", "0", *common)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "r0" / "results.csv").exists()
    bad = run_cli("evaluate", image, label, "-o", tmp_path / "r1", "--max-tiles", "-1", *common)
    assert bad.returncode == 1 and "--max-tiles must be 0 or more" in bad.stderr
    assert not (tmp_path / "r1").exists()
