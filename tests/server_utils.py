"""Helpers for the server tests: a small real model on disk, a test volume, a real server process.

The server runs as ``fastsam3d serve`` in a child process on 127.0.0.1 with a free port; start-up
and every wait are bounded in time.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

SMALL = {
    "embed_dim": 96,
    "depth": 4,
    "num_heads": 4,
    "out_chans": 64,
    "prompt_embed_dim": 64,
    "decoder_mlp_dim": 128,
    "iou_head_hidden_dim": 64,
    "decoder_heads": 4,
    "decoder_depth": 1,
}


def small_checkpoint(folder: Path) -> Path:
    """A small, randomly initialised (seeded) FastSAM3D model saved as safetensors."""
    from fastsam3d.checkpoint import save_safetensors
    from fastsam3d.registry import build_model

    torch.manual_seed(0)
    model = build_model("fastsam3d_dilated", **SMALL)
    return save_safetensors(model, folder / "small.safetensors", overwrite=True)


def make_volume():
    """A 56 x 48 x 40 volume (oblique-free, anisotropic, offset origin) with a bright block."""
    from fastsam3d.io.read import Volume

    rng = np.random.default_rng(0)
    arr = rng.normal(0, 5, (56, 48, 40)).astype(np.float32) + 20
    arr[18:38, 14:34, 10:28] += 150
    affine = np.diag([1.2, 1.5, 2.0, 1.0])
    affine[:3, 3] = [-30.0, 12.0, 40.0]
    return Volume(arr, affine)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def running_server(*args: str, token: str | None = None, timeout: float = 90.0) -> Iterator[str]:
    """Start ``fastsam3d serve ARGS`` on a free loopback port; yields its base URL."""
    port = free_port()
    cmd = [sys.executable, "-c", "from fastsam3d.cli import main; main()", "serve"]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--device", "cpu", *args]
    env = {**os.environ, "FASTSAM3D_TOKEN": token or ""}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"server exited with {proc.returncode}: {proc.stdout.read().decode()}"
                )
            try:
                if httpx.get(f"{url}/v1/health", headers=headers, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"server did not answer within {timeout} s")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


# ---------------------------------------------------------------------- shared fixtures
# Test modules load these with ``pytest_plugins = ["server_utils"]``: one model file and one
# server process serve every server test module of a run.
UPLOAD_MB = 8
MAX_VOXELS = 4_000_000
MAX_SESSIONS = 3


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    return small_checkpoint(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="session")
def server(checkpoint) -> Iterator[str]:
    """No token, nnInteractive protocol on, 8 MB uploads, 4 M voxels, 3 sessions, no idle expiry."""
    args = ["--model", str(checkpoint), "--nninteractive-compat", "--max-upload-mb", str(UPLOAD_MB)]
    args += [
        "--max-voxels",
        str(MAX_VOXELS),
        "--max-sessions",
        str(MAX_SESSIONS),
        "--idle-timeout",
        "0",
    ]
    with running_server(*args) as url:
        yield url
