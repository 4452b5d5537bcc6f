"""The ``fastsam3d`` command line (typer + rich).

Each command group lives in its own module and registers itself on :data:`app`; this file only
creates the app and imports those modules. Commands stay thin: parse, call the library, print.
"""

from __future__ import annotations

import typer

app = typer.Typer(
    name="fastsam3d",
    help="Click-based interactive 3D segmentation of CT/MR volumes (FastSAM3D).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)

# Command modules register themselves on `app` when imported, in this order (the help's).
# isort: off
from fastsam3d.cli import info, convert, segment, evaluate, doctor  # noqa: F401
from fastsam3d.cli import train, serve, bench, export, download  # noqa: F401
# isort: on


def main() -> None:
    """Console-script entry point."""
    app()
