"""What the segment / evaluate / doctor commands share: consoles, logging, user errors."""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from collections.abc import Iterator
from typing import Annotated, Any, Literal

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape

from fastsam3d.errors import FastSAM3DError

#: Messages, progress and tables go to stderr so that ``--json`` output on stdout stays clean.
console = Console(stderr=True)

EXIT_FAILED = 1
EXIT_INTERRUPTED = 130

#: ``--dtype`` of the commands that run the model (the choices of ``Predictor(dtype=...)``;
#: spelled out here so that the CLI starts without importing torch)
DtypeOption = Annotated[
    Literal["fp32", "bf16"],
    typer.Option(
        help="fp32 (the reference) or bf16: the image encoder in bfloat16 on a CPU, about 2x "
        "faster encoding where the CPU has AMX or AVX512-BF16 (fastsam3d doctor says); masks "
        "Dice >= 0.99 against fp32. On a GPU (eager) bf16 was measured slower: keep fp32.",
    ),
]

#: ``--crop-spacing`` of the commands that open a Session (``Session(crop_spacing=...)``)
CropSpacingOption = Annotated[
    float | None,
    typer.Option(
        help="mm per voxel of the 128^3 crops a click opens (default: the model's; 1.0 for the "
        "bundled model, 1.5 for the official ones; 1.5 shows a large organ more whole after "
        "one click, 1.0 scored better on average: MODEL_CARD.md).",
    ),
]


def setup_logging(verbose: int, quiet: bool) -> None:
    """Default: fastsam3d warnings only (third-party warnings, e.g. optional decoders that are
    missing, stay hidden); ``-v`` info and all warnings, ``-vv`` debug, ``-q`` only errors."""
    level = (
        logging.ERROR if quiet else (logging.WARNING, logging.INFO, logging.DEBUG)[min(verbose, 2)]
    )
    logging.captureWarnings(True)
    logging.basicConfig(
        level=level if verbose else logging.ERROR,
        format="%(message)s",
        handlers=[RichHandler(level=level, console=console, show_path=False)],
        force=True,
    )
    logging.getLogger("fastsam3d").setLevel(level)


@contextlib.contextmanager
def user_errors(*also: type[Exception]) -> Iterator[None]:
    """Turn a FastSAM3DError (and the exception types in ``also``, e.g. ValueError for a bad
    config override) into one red line on stderr and exit code 1 (no traceback). The message is
    printed as it is: brackets in it (``pip install 'fastsam3d[download]'``) are not rich markup."""
    try:
        yield
    except (FastSAM3DError, *also) as err:
        console.print(f"[red]error:[/red] {escape(str(err))}", highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_FAILED) from None


def print_json(data: Any) -> None:
    """Machine-readable output on stdout."""
    sys.stdout.write(json.dumps(data, indent=1, default=str) + "\n")
    sys.stdout.flush()
