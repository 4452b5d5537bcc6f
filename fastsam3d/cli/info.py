"""``fastsam3d info``: versions, devices, attention backends and known architectures."""

from __future__ import annotations

import platform

from rich.console import Console
from rich.table import Table

from fastsam3d.cli import app

console = Console()


@app.command()
def info() -> None:
    """Show the version, torch, devices, attention backends and model architectures."""
    import torch

    import fastsam3d

    table = Table(title="fastsam3d", show_header=False)
    table.add_row("fastsam3d", fastsam3d.__version__)
    table.add_row("python", platform.python_version())
    table.add_row("torch", torch.__version__)
    table.add_row(
        "cuda", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "not available"
    )
    table.add_row("cpu threads", str(torch.get_num_threads()))
    from fastsam3d.modeling import available_backends
    from fastsam3d.registry import DEFAULT_ARCH, list_architectures

    table.add_row("attention backends", ", ".join(available_backends()))
    for name, description in list_architectures():
        default = " (default)" if name == DEFAULT_ARCH else ""
        table.add_row(f"arch {name}{default}", description)
    console.print(table)
