"""``fastsam3d serve``: the HTTP inference server (and the nnInteractive-compatible protocol)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fastsam3d.cli import app
from fastsam3d.cli._common import CropSpacingOption, DtypeOption, console, user_errors


@app.command()
def serve(
    host: Annotated[
        str, typer.Option(help="Address to bind; anything but loopback needs a token.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.", min=0, max=65535)] = 8765,
    token: Annotated[
        str | None,
        typer.Option(
            help="Require 'Authorization: Bearer TOKEN' (default: $FASTSAM3D_TOKEN).",
            show_default=False,
        ),
    ] = None,
    model: Annotated[
        str, typer.Option(help="'default' (bundled weights) or a checkpoint file.")
    ] = "default",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1, ...")] = "auto",
    dtype: DtypeOption = "fp32",
    crop_spacing: CropSpacingOption = None,
    nninteractive_compat: Annotated[
        bool,
        typer.Option(
            help="Also serve nnInteractive's remote protocol (its Slicer/napari/ITK-SNAP front ends)."
        ),
    ] = False,
    max_upload_mb: Annotated[
        float, typer.Option(help="Largest request body in MB (413 beyond).", min=0.001)
    ] = 512,
    max_voxels: Annotated[
        int, typer.Option(help="Largest volume in voxels (413 beyond).", min=8)
    ] = 512**3,
    max_sessions: Annotated[
        int, typer.Option(help="Live sessions; more evict the least recently used.", min=1)
    ] = 8,
    idle_timeout: Annotated[
        float,
        typer.Option(help="Seconds before an untouched session is dropped (0 = never).", min=0),
    ] = 1800,
) -> None:
    """Serve interactive segmentation over HTTP (OpenAPI docs at /docs)."""
    import uvicorn

    from fastsam3d.server.app import create_app
    from fastsam3d.server.auth import resolve_token

    with user_errors():
        token = resolve_token(host, token)
        checkpoint = model if model == "default" else Path(model)
        application = create_app(
            checkpoint,
            device=device,
            dtype=dtype,
            token=token,
            max_upload_mb=max_upload_mb,
            max_voxels=max_voxels,
            max_sessions=max_sessions,
            idle_timeout=idle_timeout,
            nninteractive_compat=nninteractive_compat,
            crop_spacing=crop_spacing,
        )
    auth = "token required" if token else "no token (loopback only)"
    compat = ", nnInteractive protocol at /" if nninteractive_compat else ""
    state = application.state
    console.print(
        f"fastsam3d server on http://{host}:{port} ({auth}{compat}); docs at /docs; "
        f"model {state.model_name} on {state.device}, {state.dtype}",
        highlight=False,
    )
    uvicorn.run(application, host=host, port=port, log_level="warning", timeout_keep_alive=30)
