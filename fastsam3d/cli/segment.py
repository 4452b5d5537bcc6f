"""``fastsam3d segment``: one volume with clicks, or a folder of cases with a prompts file.

Single: ``fastsam3d segment ct.nii.gz -o mask.nii.gz --point 60,48,55 --point 70,40,50:neg``.
Batch: ``fastsam3d segment cases/ -o masks/ --prompts prompts.csv`` (formats:
:mod:`fastsam3d.batch`). Thin: parse, call :mod:`fastsam3d.batch`, print.
"""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from fastsam3d.cli import app
from fastsam3d.cli._common import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    CropSpacingOption,
    DtypeOption,
    console,
    print_json,
    setup_logging,
    user_errors,
)
from fastsam3d.errors import FastSAM3DError, OutputExistsError, PromptError

if TYPE_CHECKING:
    from fastsam3d.batch import Case, CasePrompts, CaseResult
    from fastsam3d.io.read import Volume

SAMPLE = "sample"


def load_input(text: str) -> Volume:
    """A volume from a file or DICOM folder, or the bundled sample CT for the word ``sample``."""
    from fastsam3d.io.read import load_volume

    if text == SAMPLE and not Path(text).exists():
        from fastsam3d.sample_data import sample_path

        return load_volume(sample_path())
    return load_volume(text)


def make_session(model: str, device: str, **options):
    """The session every command uses (clear CheckpointError when no default weights exist);
    ``options`` go to :class:`fastsam3d.session.Session`."""
    from fastsam3d.predictor import UNTRAINED
    from fastsam3d.session import Session

    if model == UNTRAINED:
        console.print(
            "[bold yellow]warning:[/] --model untrained runs the real pipeline with RANDOM "
            "weights: the mask it writes is meaningless",
            highlight=False,
        )
    return Session(model=model, device=device, **options)


@app.command()
def segment(
    input: Annotated[
        str,
        typer.Argument(
            help="Volume file or DICOM folder, 'sample' for the bundled CT, or (with a "
            "multi-case --prompts file) a folder of cases.",
            show_default=False,
        ),
    ],
    output: Annotated[
        Path,
        typer.Option(
            "--output",
            "-o",
            help="Mask file (.nii.gz, .nrrd, .mha; .dcm = DICOM-SEG for DICOM "
            "input), or the output folder of a batch.",
            show_default=False,
        ),
    ],
    point: Annotated[
        list[str] | None,
        typer.Option(
            "--point",
            "-p",
            help="Click X,Y,Z[:pos|:neg][:OBJECT_ID]; repeat for successive clicks.",
        ),
    ] = None,
    box: Annotated[
        list[str] | None,
        typer.Option(
            "--box",
            "-b",
            help="Box X0,Y0,Z0,X1,Y1,Z1[:OBJECT_ID] (opposite corners) as an object's first "
            "prompt, before the clicks; repeatable (one per object).",
        ),
    ] = None,
    prompts: Annotated[
        Path | None,
        typer.Option(help="Prompt log (.json, one volume) or prompts file (.json/.csv, a batch)."),
    ] = None,
    coords: Annotated[
        str, typer.Option(help="Coordinates of points and boxes: voxel, ras or lps.")
    ] = "voxel",
    model: Annotated[
        str,
        typer.Option(
            help="'default' (bundled weights), a checkpoint path, an export-onnx folder "
            "(onnxruntime, CPU) or 'untrained' (random weights, pipeline check only)."
        ),
    ] = "default",
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    dtype: DtypeOption = "fp32",
    crop_spacing: CropSpacingOption = None,
    overwrite: Annotated[bool, typer.Option(help="Replace existing outputs.")] = False,
    resume: Annotated[bool, typer.Option(help="Batch: skip cases whose output exists.")] = False,
    suffix: Annotated[str, typer.Option(help="Batch: output file extension.")] = ".nii.gz",
    dask: Annotated[
        str | None,
        typer.Option(help="Batch: run on Dask, 'local' (a LocalCluster) or a scheduler address."),
    ] = None,
    workers: Annotated[int, typer.Option(help="Batch with --dask local: number of workers.")] = 1,
    json_output: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True, help="More logging.")] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only errors.")] = False,
) -> None:
    """Segment a volume from clicks, or every case of a folder from a prompts file."""
    from fastsam3d.batch import CasePrompts, parse_box, parse_point, read_prompts

    setup_logging(verbose, quiet)
    with user_errors():
        points = [parse_point(p, coords) for p in point or []]
        boxes = [parse_box(b, coords) for b in box or []]
        case_prompts = read_prompts(prompts, coords) if prompts is not None else None
        if isinstance(case_prompts, dict):
            if points or boxes:
                raise PromptError(
                    "--point and --box cannot be combined with a multi-case prompts file"
                )
            code = _run_batch(
                Path(input),
                output,
                case_prompts,
                prompts,
                model=model,
                device=device,
                dtype=dtype,
                crop_spacing=crop_spacing,
                overwrite=overwrite,
                resume=resume,
                suffix=suffix,
                dask=dask,
                workers=workers,
                json_output=json_output,
                quiet=quiet,
            )
            raise typer.Exit(code)
        single = case_prompts or CasePrompts()
        single = replace(single, points=[*single.points, *points], boxes=boxes)
        if single.log is None and not single.points and not single.boxes:
            raise PromptError(
                "no prompts: give at least one --point X,Y,Z, --box X0,Y0,Z0,X1,Y1,Z1 "
                "or --prompts FILE"
            )
        _run_single(
            input, output, single, model, device, dtype, crop_spacing, overwrite, json_output, quiet
        )


def _run_single(
    input: str,
    output: Path,
    prompts: CasePrompts,
    model: str,
    device: str,
    dtype: str,
    crop_spacing: float | None,
    overwrite: bool,
    json_output: bool,
    quiet: bool,
) -> None:
    from fastsam3d.batch import case_name, segment_volume

    if output.exists() and not overwrite:
        raise OutputExistsError(f"{output} already exists; pass --overwrite to replace it")
    volume = load_input(input)
    prompts.check(volume)
    session = make_session(model, device, dtype=dtype, crop_spacing=crop_spacing)
    result = segment_volume(
        session, volume, prompts, output, overwrite, name=case_name(Path(input))
    )
    where = {"model": session.model_name, "device": str(session.predictor.device), "dtype": dtype}
    if json_output:
        print_json({**asdict(result), **where})
    elif not quiet:
        console.print(
            f"wrote [bold]{result.output}[/bold]: {result.objects} object(s), {result.voxels:,} "
            f"voxels, {result.volume_ml:.1f} ml in {result.seconds:.2f} s "
            f"({where['model']} on {where['device']}, {dtype})",
            highlight=False,
        )


def _run_batch(
    input_dir: Path,
    output_dir: Path,
    prompts: dict[str, CasePrompts],
    prompts_file: Path,
    *,
    model: str,
    device: str,
    dtype: str,
    crop_spacing: float | None,
    overwrite: bool,
    resume: bool,
    suffix: str,
    dask: str | None,
    workers: int,
    json_output: bool,
    quiet: bool,
) -> int:
    """Run a batch; returns the exit code (0 only if every case succeeded)."""
    from fastsam3d.batch import CaseResult, check_outputs, plan_batch, run_batch, write_summary

    plan, unprompted = plan_batch(input_dir, prompts, output_dir, suffix, prompts_file)
    check_outputs(plan, overwrite, resume)
    if unprompted and not quiet:
        console.print(
            f"note: {len(unprompted)} case(s) in {input_dir} have no prompts and are not run: "
            + ", ".join(unprompted[:5])
            + (", ..." if len(unprompted) > 5 else ""),
            highlight=False,
        )
    progress = Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
        disable=quiet,
    )
    task = progress.add_task("starting", total=len(plan))

    def on_start(case: Case) -> None:
        progress.update(task, description=f"[bold]{case.name}[/bold]")

    if dask is None:
        session = make_session(model, device, dtype=dtype, crop_spacing=crop_spacing)
        results_iter = run_batch(
            session, plan, overwrite=overwrite, resume=resume, on_start=on_start
        )
    else:
        try:
            from fastsam3d.distributed import run_batch_dask
        except ImportError:
            raise FastSAM3DError(
                "--dask needs dask.distributed: pip install 'fastsam3d[dask]'"
            ) from None

        results_iter = run_batch_dask(
            plan,
            model,
            device,
            dask,
            dtype=dtype,
            crop_spacing=crop_spacing,
            overwrite=overwrite,
            resume=resume,
            workers=workers,
        )
    results: list[CaseResult] = []
    interrupted = False
    with progress:
        try:
            for result in results_iter:
                results.append(result)
                progress.update(task, advance=1, description=f"{result.case}: {result.status}")
                if result.status == "failed":
                    progress.console.print(
                        f"[red]failed[/red] {result.case}: {result.error}", highlight=False
                    )
        except KeyboardInterrupt:
            interrupted = True
    done = {r.case for r in results}
    results += [
        CaseResult(c.name, "not run", error="interrupted") for c in plan if c.name not in done
    ]
    order = {c.name: n for n, c in enumerate(plan)}
    results.sort(key=lambda r: order[r.case])  # Dask returns cases as they finish
    csv_path, json_path = write_summary(results, output_dir)
    failed = [r for r in results if r.status not in ("ok", "skipped")]
    if json_output:
        print_json(
            {
                "cases": [asdict(r) for r in results],
                "failed": len(failed),
                "summary_csv": str(csv_path),
                "summary_json": str(json_path),
                "interrupted": interrupted,
            }
        )
    elif not quiet:
        console.print(_summary_table(results))
        console.print(f"summary: {csv_path} and {json_path.name}", highlight=False)
    if interrupted:
        console.print(
            "[yellow]interrupted[/yellow]: finished cases are kept; rerun with --resume to continue"
        )
        return EXIT_INTERRUPTED
    return EXIT_FAILED if failed else 0


def _summary_table(results: list[CaseResult]) -> Table:
    table = Table(title="fastsam3d segment: summary")
    for col, justify in [
        ("case", "left"),
        ("status", "left"),
        ("objects", "right"),
        ("voxels", "right"),
        ("volume ml", "right"),
        ("seconds", "right"),
        ("error", "left"),
    ]:
        table.add_column(col, justify=justify, overflow="fold")
    colours = {"ok": "green", "skipped": "cyan", "failed": "red", "not run": "yellow"}
    for r in results:
        table.add_row(
            r.case,
            f"[{colours.get(r.status, 'white')}]{r.status}[/]",
            str(r.objects),
            f"{r.voxels:,}",
            f"{r.volume_ml:.1f}",
            f"{r.seconds:.2f}",
            r.error,
        )
    return table
