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
    table.add_row("cuda", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "not available")
    table.add_row("cpu threads", str(torch.get_num_threads()))
    console.print(table)
