"""``fastsam3d evaluate``: the simulated-click protocol on labelled volumes, model vs baseline."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from fastsam3d.cli import app
from fastsam3d.cli._common import (
    CropSpacingOption,
    DtypeOption,
    console,
    print_json,
    setup_logging,
    user_errors,
)
from fastsam3d.errors import PromptError, VolumeError

REPORT_STEPS = (1, 3, 5, 10)


def _label_ids(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise PromptError(f"--labels {text!r}: expected integers separated by commas") from None


def _load_pair(image: Path | str, label: Path):
    """The image (or the sample CT) and its integer labels, checked to share a grid."""
    import numpy as np

    from fastsam3d.cli.segment import load_input
    from fastsam3d.io.read import load_volume

    volume = load_input(str(image))
    lab = load_volume(label)
    if lab.array.shape != volume.array.shape or not np.allclose(
        lab.affine, volume.affine, atol=1e-3
    ):
        raise VolumeError(
            f"{label}: label grid {lab.array.shape} does not match the image {image} "
            f"{volume.array.shape} (shape and affine must agree)"
        )
    return volume, np.rint(lab.array).astype(np.int64)


@app.command()
def evaluate(
    images: Annotated[
        str, typer.Argument(help="Image file or folder of images ('sample': the bundled CT).")
    ],
    labels: Annotated[
        str,
        typer.Argument(help="Label file or folder of labels with the images' names ('sample')."),
    ],
    report_dir: Annotated[Path, typer.Option("--output", "-o", help="Report folder.")],
    clicks: Annotated[int, typer.Option(help="Simulated clicks per label.")] = 10,
    label_ids: Annotated[
        str | None, typer.Option("--labels", help="Label ids, e.g. 1,2,5 (default: all present).")
    ] = None,
    model: Annotated[
        str, typer.Option(help="'default', a checkpoint path or an export-onnx folder.")
    ] = "default",
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    dtype: DtypeOption = "fp32",
    seed: Annotated[int, typer.Option(help="Seed of the simulated clicks.")] = 2023,
    tolerance: Annotated[float, typer.Option(help="Surface Dice tolerance in mm.")] = 2.0,
    baseline: Annotated[bool, typer.Option(help="Run the region-growing baseline too.")] = True,
    max_tiles: Annotated[
        int | None,
        typer.Option(
            help="Neighbouring crops one click may grow into where the mask reaches a crop "
            "face (default: the session's, 0: one 128^3 crop per click)."
        ),
    ] = None,
    crop_spacing: CropSpacingOption = None,
    box: Annotated[
        bool | None, typer.Option(help="CVPR 2025 box protocol (default: if the model has boxes).")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing report.")] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True, help="More logging.")] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only errors.")] = False,
) -> None:
    """Dice and surface Dice per label and click (SPEC §10 clicks), beside a classical baseline.

    Writes into the -o folder: results.csv (every case, label, method and click), summary.csv
    (means, overall and per label) and dice_vs_clicks.png.
    """
    from fastsam3d.cli.segment import SAMPLE, make_session
    from fastsam3d.evaluate import evaluate_case, pair_cases, summarize, write_report

    setup_logging(verbose, quiet)
    with user_errors():
        if clicks < 1:
            raise PromptError("--clicks must be at least 1")
        ids = _label_ids(label_ids)
        if images == SAMPLE and labels == SAMPLE:
            from fastsam3d.sample_data import sample_paths

            image_path, label_path = sample_paths()
            cases = [("sample", image_path, label_path)]
        else:
            cases = pair_cases(images, labels)
        existing = [
            report_dir / n for n in ("results.csv", "summary.csv") if (report_dir / n).exists()
        ]
        if existing and not overwrite:
            from fastsam3d.errors import OutputExistsError

            raise OutputExistsError(
                f"{existing[0]} already exists; pass --overwrite to replace the report"
            )
        if max_tiles is not None and max_tiles < 0:
            raise PromptError("--max-tiles must be 0 or more")
        tiles = {} if max_tiles is None else {"max_new_tiles": max_tiles}
        session = make_session(model, device, dtype=dtype, crop_spacing=crop_spacing, **tiles)
        rows = []
        progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeRemainingColumn(), console=console, disable=quiet,
        )  # fmt: skip
        with progress:
            task = progress.add_task("evaluating", total=len(cases))
            for name, image, label in cases:
                progress.update(task, description=f"[bold]{name}[/bold]")
                volume, lab = _load_pair(image, label)
                rows += evaluate_case(
                    session, volume, lab, ids, clicks, seed, baseline, box, tolerance, name
                )
                progress.advance(task)
        paths = write_report(
            rows, report_dir, overwrite, title=f"{session.model_name}: Dice vs clicks"
        )
        summary = summarize(rows, per_label=True)
        if json_output:
            print_json({"summary": summary, "files": {k: str(v) for k, v in paths.items()},
                        "rows": [asdict(r) for r in rows]})  # fmt: skip
        elif not quiet:
            console.print(_table(summary, tolerance))
            console.print(f"report: {', '.join(str(p) for p in paths.values())}", highlight=False)


def _table(summary: list[dict], tolerance: float) -> Table:
    """Model beside baseline at 1, 3, 5, 10 prompts (and the last), overall and per label."""
    table = Table(title=f"Dice / NSD@{tolerance:g}mm (mean over cases)")
    columns = ("label", "protocol", "prompts", "model Dice", "baseline Dice", "model NSD",
               "baseline NSD", "model s/click")  # fmt: skip
    for col in columns:
        table.add_column(col, justify="left" if col in ("label", "protocol") else "right")
    index = {(s["label"], s["protocol"], s["method"], s["step"]): s for s in summary}
    steps = sorted({s["step"] for s in summary})
    shown = [s for s in steps if s in REPORT_STEPS or s == steps[-1]]
    keys = dict.fromkeys((s["label"], s["protocol"]) for s in summary)  # summary order
    for label, protocol in keys:
        if label != "all" and len({k[0] for k in keys}) == 2:
            continue  # one label: its rows equal the "all" rows
        for step in shown:
            m = index.get((label, protocol, "model", step))
            b = index.get((label, protocol, "baseline", step))
            if m is None:
                continue
            table.add_row(
                label, protocol, str(step), f"{m['dice']:.3f}", f"{b['dice']:.3f}" if b else "-",
                f"{m['nsd']:.3f}", f"{b['nsd']:.3f}" if b else "-", f"{m['seconds']:.2f}",
            )  # fmt: skip
        if label == "all":
            table.add_section()
    return table
