"""``fastsam3d convert``: any supported checkpoint -> our safetensors format."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from fastsam3d.cli import app
from fastsam3d.cli._common import user_errors

console = Console(stderr=True)


@app.command()
def convert(
    checkpoint: Annotated[Path, typer.Argument(help="Official .pth or our .safetensors file.")],
    out: Annotated[Path, typer.Argument(help="Output .safetensors file.")],
    arch: Annotated[
        str | None, typer.Option(help="Architecture (default: inferred from the tensors).")
    ] = None,
    decoder_checkpoint: Annotated[
        Path | None,
        typer.Option(help="SAM-Med3D file giving the decoder of an encoder-only student."),
    ] = None,
    mean_with: Annotated[
        list[Path] | None,
        typer.Option(
            "--mean-with",
            help="Average CHECKPOINT's weights with this checkpoint's (repeatable; same "
            "architecture): a model soup, e.g. of a run's snapshots/ or of a fine-tune and its start.",
        ),
    ] = None,
    dtype: Annotated[str, typer.Option(help="fp32, fp16 or int8 (Linear weights).")] = "fp32",
    overwrite: Annotated[bool, typer.Option(help="Replace OUT if it exists.")] = False,
) -> None:
    """Convert CHECKPOINT to OUT.safetensors, with the architecture config in its metadata."""
    from fastsam3d.checkpoint import average_weights, save_safetensors
    from fastsam3d.registry import build_model

    with user_errors(ValueError):
        model = build_model(arch, checkpoint=checkpoint, decoder_checkpoint=decoder_checkpoint)
        sources = [checkpoint, *(mean_with or [])]
        if mean_with:
            average_weights(model, [build_model(arch, checkpoint=p) for p in mean_with])
        path = save_safetensors(
            model, out, dtype=dtype, overwrite=overwrite,
            metadata={"source": " + ".join(p.name for p in sources)},
        )  # fmt: skip
    n = sum(p.numel() for p in model.parameters())
    what = f"mean of {len(sources)} checkpoints, " if mean_with else ""
    console.print(f"wrote {path} ({what}{model.config.arch}, {n:,} parameters, {dtype})")
