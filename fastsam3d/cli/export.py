"""``fastsam3d export-onnx``: the model as two ONNX graphs for onnxruntime (no torch needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fastsam3d.cli import app
from fastsam3d.cli._common import console, user_errors


@app.command("export-onnx")
def export_onnx_command(
    out_dir: Annotated[
        Path,
        typer.Argument(
            help="Folder for encoder.onnx and decoder.onnx (and decoder_first.onnx for models "
            "trained with finetune --multimask)."
        ),
    ],
    model: Annotated[
        str, typer.Option(help="'default' (bundled weights) or a checkpoint file.")
    ] = "default",
    check: Annotated[
        bool, typer.Option(help="Run onnxruntime beside torch on a synthetic crop and compare.")
    ] = True,
) -> None:
    """Export the image encoder and the click decoder (prompt encoder + mask decoder)."""
    from fastsam3d.export import export_onnx
    from fastsam3d.predictor import load_predictor

    with user_errors():
        predictor, name = load_predictor(model, "cpu")
        first = " (+ decoder_first.onnx)" if predictor.first_click_multimask else ""
        if not check:
            enc, dec = export_onnx(predictor.model, out_dir)
            console.print(f"wrote {enc} and {dec}{first} ({name})")
            return
        from fastsam3d.bench import bench_onnx

        row = bench_onnx(lambda: predictor.model, out_dir)
    console.print(
        f"wrote {out_dir}/encoder.onnx and decoder.onnx{first} ({name}); onnxruntime vs torch on the "
        f"CPU: max |logit diff| {row['max_abs_logit_diff']:.1e}, mask Dice {row['dice']:.4f}, "
        f"encoder {row['ort_encoder_ms']:.0f} vs {row['torch_encoder_ms']:.0f} ms, click "
        f"{row['ort_click_ms']:.1f} vs {row['torch_click_ms']:.1f} ms"
    )
