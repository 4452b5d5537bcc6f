"""``fastsam3d bench``: latency, throughput, memory and accuracy of the model paths."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from fastsam3d.cli import app
from fastsam3d.cli._common import console


@app.command()
def bench(
    arch: Annotated[
        list[str] | None, typer.Option(help="Architecture(s) (default fastsam3d_dilated).")
    ] = None,
    checkpoint: Annotated[Path | None, typer.Option(help="Weights instead of random.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    repeats: Annotated[int | None, typer.Option(help="Timed runs per figure.")] = None,
    compile: Annotated[bool, typer.Option(help="Add torch.compile (slow to build).")] = False,
    sparse: Annotated[bool, typer.Option(help="Dense vs sparse attention at 128-256^3.")] = False,
    pipeline: Annotated[
        bool, typer.Option(help="CPU: file -> mask for a 512x512x300 CT-like volume.")
    ] = False,
    onnx: Annotated[bool, typer.Option(help="CPU: onnxruntime beside torch.")] = False,
    refine: Annotated[
        bool, typer.Option(help="CPU: refinement clicks through the Session, 128^3 and a CT.")
    ] = False,
) -> None:
    """Print JSON lines (each figure beside a same-run eager float32 baseline) and a table.

    JSON goes to stdout, the table to stderr.
    """
    import tempfile

    from fastsam3d import bench as b
    from fastsam3d.registry import build_model

    ckpt = str(checkpoint) if checkpoint else None
    rows = b.run_model_bench(arch or ["fastsam3d_dilated"], device, repeats, None, compile, ckpt)
    extra = []
    if sparse:
        extra += b.bench_sparse(device)
    if pipeline:
        extra += b.bench_pipeline(checkpoint=ckpt)
    if refine:
        extra += b.bench_refine(ckpt or "untrained")
    if onnx:
        name = (arch or ["fastsam3d_dilated"])[0]
        with tempfile.TemporaryDirectory() as tmp:
            factory = (
                (lambda: build_model(checkpoint=ckpt)) if ckpt else (lambda: build_model(name))
            )
            extra.append(b.bench_onnx(factory, tmp))
    for row in extra:
        print(json.dumps(row), flush=True)
    console.print(b.table(rows + extra), highlight=False)
