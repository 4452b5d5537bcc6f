"""``fastsam3d download NAME``: fetch an official checkpoint (the one command that goes online)."""

from __future__ import annotations

import shlex
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer

from fastsam3d.cli import app
from fastsam3d.cli._common import console, print_json, user_errors

CacheOpt = Annotated[
    Path | None,
    typer.Option(
        help="Cache folder (default: $FASTSAM3D_CACHE, else the Hugging Face cache, "
        "~/.cache/huggingface/hub).",
        file_okay=False,
    ),
]


@app.command()
def download(
    name: Annotated[str, typer.Argument(help="Checkpoint name, as `fastsam3d models` lists.")],
    cache: CacheOpt = None,
    revision: Annotated[
        str | None, typer.Option(help="Branch, tag or commit on the Hub (default: main).")
    ] = None,
    endpoint: Annotated[
        str | None,
        typer.Option(help="Hub URL, for a mirror (default: $HF_ENDPOINT, else huggingface.co)."),
    ] = None,
    offline: Annotated[
        bool, typer.Option(help="Use only the cache, never the network (also HF_HUB_OFFLINE=1).")
    ] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Download an official checkpoint by name into the cache, check its sha256 and that it loads,
    and print the --model PATH to use. The only command that uses the network (needs
    huggingface_hub: the `download` extra)."""
    from fastsam3d.weights.hub import fetch

    with user_errors():
        got = fetch(name, cache=cache, revision=revision, endpoint=endpoint, offline=offline)
    if json_output:
        print_json(asdict(got))
        return
    check = (
        f"matches {got.checked_against}"
        if got.checked_against
        else "NOT verified: no pinned or Hub sha256 to compare with"
    )
    for line in (
        f"{got.name}: {got.path}",
        f"  {got.size / 2**20:.1f} MiB, sha256 {got.sha256} ({check})",
        f"  loads as {got.arch} ({got.parameters:,} parameters)",
        f"  revision {got.revision}, commit {got.commit}",
        f"use it with: --model {shlex.quote(str(got.path))}",
    ):
        console.print(line, markup=False, highlight=False, soft_wrap=True)
