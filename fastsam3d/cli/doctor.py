"""``fastsam3d doctor``: is the installation complete, and is this machine fast enough?"""

from __future__ import annotations

import importlib
import time
from typing import Annotated

import typer
from rich.table import Table

from fastsam3d.cli import app
from fastsam3d.cli._common import EXIT_FAILED, DtypeOption, console, print_json, setup_logging

#: (module, what needs it, required)
MODULES = (
    ("torch", "the model", True),
    ("numpy", "everything", True),
    ("monai", "reading volumes, metrics", True),
    ("SimpleITK", "NRRD/MHA/DICOM, baseline", True),
    ("nibabel", "NIfTI", True),
    ("pydicom", "DICOM", True),
    ("typer", "command line", True),
    ("safetensors", "checkpoints", True),
    ("highdicom", "DICOM-SEG output (extra: dicomseg)", False),
    ("matplotlib", "evaluate plots (extra: report)", False),
    ("dask.distributed", "segment --dask (extra: dask)", False),
    ("fastapi", "fastsam3d serve (extra: server)", False),
    ("napari", "napari plugin (extra: napari)", False),
)
COMFORT_FIRST_S = 1.0  # first click on a new crop (image encoder + decoder)
COMFORT_REFINE_S = 0.25  # refinement click (decoder only): feels immediate below this


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


@app.command()
def doctor(
    model: Annotated[
        str,
        typer.Option(help="'default' or a checkpoint path to time instead of the bundled model."),
    ] = "default",
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    dtype: DtypeOption = "fp32",
    clicks: Annotated[int, typer.Option(help="Refinement clicks to time.")] = 5,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print the findings as JSON.")
    ] = False,
) -> None:
    """Check imports, weights, sample data and device; time first and refinement clicks."""
    setup_logging(0, False)
    checks: list[dict] = []

    def check(name: str, ok: bool, detail: str, required: bool = True) -> None:
        checks.append({"check": name, "ok": ok, "detail": detail, "required": required})

    for module, need, required in MODULES:
        try:
            mod = importlib.import_module(module)
            check(
                f"import {module}",
                True,
                f"{getattr(mod, '__version__', '')} ({need})".strip(),
                required,
            )
        except Exception as err:  # noqa: BLE001 - any import failure is a finding
            check(f"import {module}", False, f"{type(err).__name__}: {err} ({need})", required)

    from fastsam3d.predictor import cpu_bf16_units, resolve_device
    from fastsam3d.weights import default_checkpoint

    dev = resolve_device(device)
    check("device", True, str(dev))
    if dev.type == "cpu":
        units = cpu_bf16_units()
        check(
            "bfloat16 units", bool(units),
            f"{', '.join(units)}: --dtype bf16 encodes about 2x faster" if units
            else "none: keep --dtype fp32 (bfloat16 would be emulated, slower)", required=False,
        )  # fmt: skip
    weights = default_checkpoint()
    check(
        "default weights", weights is not None,
        str(weights) if weights else "none bundled: pass --model PATH to segment", required=False,
    )  # fmt: skip
    volume = None
    try:
        from fastsam3d.cli.segment import load_input

        volume = load_input("sample")
        check("sample data", True, f"{volume.source}: {volume.array.shape} voxels")
    except Exception as err:  # noqa: BLE001
        check("sample data", False, f"{type(err).__name__}: {err}")
    timing = (
        _latency(model, device, dtype, volume, clicks, weights is not None)
        if volume is not None
        else None
    )
    if timing is not None and "error" in timing:
        check("latency", False, timing["error"])
    failed = [c for c in checks if c["required"] and not c["ok"]]
    if json_output:
        print_json({"checks": checks, "latency": timing, "ok": not failed})
    else:
        table = Table(title="fastsam3d doctor")
        for col in ("check", "", "detail"):
            table.add_column(col)
        for c in checks:
            mark = (
                "[green]ok[/]"
                if c["ok"]
                else ("[red]FAIL[/]" if c["required"] else "[yellow]missing[/]")
            )
            table.add_row(c["check"], mark, c["detail"])
        console.print(table)
        if timing is not None and "error" not in timing:
            console.print(_verdict(timing), highlight=False)
    if failed:
        raise typer.Exit(EXIT_FAILED)


def _latency(model: str, device: str, dtype: str, volume, clicks: int, have_weights: bool) -> dict:
    """Time clicks on the sample CT. Without weights (and no --model) a randomly initialised
    model of the default architecture is timed: same speed, and it is labelled as such."""
    import numpy as np

    from fastsam3d.errors import FastSAM3DError
    from fastsam3d.registry import DEFAULT_ARCH, build_model
    from fastsam3d.session import Session

    try:
        if model == "default" and not have_weights:
            session = Session(build_model(DEFAULT_ARCH), device, dtype=dtype, max_new_tiles=0)
            name = f"{DEFAULT_ARCH} (random weights, timing only)"
        else:
            session = Session(model, device, dtype=dtype, max_new_tiles=0)
            name = session.model_name
    except FastSAM3DError as err:
        return {"error": str(err)}
    session.set_volume(volume)
    centre = np.asarray(volume.array.shape) // 2
    warm = _timed(lambda: session.add_point(centre))  # includes one-off set-up (threads, kernels)
    session.new_object()
    far = np.clip(
        centre + np.asarray(volume.array.shape) // 4, 0, np.asarray(volume.array.shape) - 1
    )
    first = _timed(lambda: session.add_point(far))  # a new crop: image encoder + decoder
    refine = []
    for n in range(clicks):  # nearby clicks in the same crop: prompt encoder + decoder only
        point = far + (n % 3 - 1, 0, 0)
        refine.append(_timed(lambda p=point: session.add_point(p)))
    return {
        "model": name,
        "device": str(session.predictor.device),
        "dtype": dtype,
        "warm_up_s": round(warm, 3),
        "first_click_s": round(first, 3),
        "refine_click_s": round(float(np.median(refine)), 3),
        "note": "one model crop per click (no tile growth), sample CT",
    }


def _verdict(t: dict) -> str:
    comfy = t["first_click_s"] <= COMFORT_FIRST_S and t["refine_click_s"] <= COMFORT_REFINE_S
    verdict = (
        "[green]interactive use will be comfortable[/green]"
        if comfy
        else "[yellow]interactive use will feel slow[/yellow] (a GPU or a smaller model helps)"
    )
    return (
        f"latency ({t['model']} on {t['device']}, {t['dtype']}): first click on a new crop "
        f"{t['first_click_s'] * 1000:.0f} ms, refinement click {t['refine_click_s'] * 1000:.0f} ms "
        f"(median), one-off warm-up {t['warm_up_s']:.2f} s\n"
        f"targets: first <= {COMFORT_FIRST_S * 1000:.0f} ms, refinement <= "
        f"{COMFORT_REFINE_S * 1000:.0f} ms -> {verdict}"
    )
