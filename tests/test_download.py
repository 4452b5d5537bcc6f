"""``fastsam3d download``: the real huggingface_hub against a local stand-in for the Hub (real HTTP
on 127.0.0.1, no mocks): download + sha256 + load, the cache offline, refusals and errors."""

from __future__ import annotations

import argparse
import hashlib
import json
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from io import BytesIO
from pathlib import Path

import pytest
import torch
from click.testing import Result
from typer.testing import CliRunner

from fastsam3d import weights
from fastsam3d.cli import app
from fastsam3d.registry import build_model
from fastsam3d.weights import KnownCheckpoint
from fastsam3d.weights.hub import CACHE_ENV, cached_path

pytest.importorskip("huggingface_hub")

REPO = "tester/tiny-sam-med3d"
FILENAME = "tiny_turbo.pth"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
TEACHER = {
    "embed_dim": 48, "out_chans": 24, "prompt_embed_dim": 48, "decoder_mlp_dim": 64,
    "depth": 3, "global_attn_indexes": (2,),
}  # fmt: skip


def _serve(respond: Callable[[BaseHTTPRequestHandler, bool], None]) -> ThreadingHTTPServer:
    """An HTTP server on a free 127.0.0.1 port, answering HEAD and GET with ``respond``."""

    class Handler(BaseHTTPRequestHandler):
        def do_HEAD(self) -> None:
            respond(self, False)

        def do_GET(self) -> None:
            respond(self, True)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


class LocalHub:
    """huggingface.co and its file CDN, as two local servers.

    ``HEAD|GET /{repo}/resolve/{revision}/{filename}`` answers as the Hub does for an LFS file
    (file_download.get_hf_file_metadata reads these headers): 302 to another host (the CDN, here
    another port, so huggingface_hub does not follow it for the HEAD) with X-Repo-Commit,
    X-Linked-Etag (the sha256), X-Linked-Size and the pointer file's own ETag. A missing file
    gets 404 with X-Error-Code: EntryNotFound. The CDN sends the bytes with Content-Length.
    """

    def __init__(self) -> None:
        self.files: dict[tuple[str, str], tuple[bytes, str]] = {}
        self.hub = _serve(self._resolve)
        self.cdn = _serve(self._blob)
        self.url = f"http://127.0.0.1:{self.hub.server_port}"

    def add(self, repo: str, filename: str, data: bytes, advertised: str | None = None) -> None:
        """Serve ``data``; the Hub claims sha256 ``advertised`` (default: the true one)."""
        self.files[(repo, filename)] = (data, advertised or hashlib.sha256(data).hexdigest())

    def close(self) -> None:
        for server in (self.hub, self.cdn):
            server.shutdown()
            server.server_close()

    def _resolve(self, req: BaseHTTPRequestHandler, body: bool) -> None:
        repo, _, rest = req.path.lstrip("/").partition("/resolve/")
        revision, _, filename = rest.partition("/")
        found = self.files.get((repo, filename)) if revision in ("main", COMMIT) else None
        req.send_response(302 if found else 404)
        req.send_header("X-Repo-Commit", COMMIT)
        if found is None:
            req.send_header("X-Error-Code", "EntryNotFound")
        else:
            data, sha = found
            req.send_header(
                "Location", f"http://127.0.0.1:{self.cdn.server_port}/{repo}/{filename}"
            )
            req.send_header("X-Linked-Etag", f'"{sha}"')
            req.send_header("X-Linked-Size", str(len(data)))
            req.send_header("ETag", f'"{hashlib.sha1(data).hexdigest()}"')
        req.send_header("Content-Length", "0")
        req.end_headers()

    def _blob(self, req: BaseHTTPRequestHandler, body: bool) -> None:
        repo, _, filename = req.path.lstrip("/").rpartition("/")
        data = self.files[(repo, filename)][0]
        req.send_response(200)
        req.send_header("Content-Type", "application/octet-stream")
        req.send_header("Content-Length", str(len(data)))
        req.end_headers()
        if body:
            req.wfile.write(data)


@pytest.fixture(scope="module")
def checkpoint() -> bytes:
    """A tiny SAM-Med3D model saved as the official trainers do (dict + argparse.Namespace)."""
    torch.manual_seed(0)
    sd = build_model("sam_med3d", **TEACHER).state_dict()
    args = argparse.Namespace(model_type="vit_b_ori", lr=8e-4)
    buffer = BytesIO()
    torch.save({"epoch": 1, "model_state_dict": sd, "args": args}, buffer)
    return buffer.getvalue()


@pytest.fixture
def online(monkeypatch: pytest.MonkeyPatch) -> None:
    """Talking to 127.0.0.1 is allowed even where CI sets HF_HUB_OFFLINE or a proxy."""
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv(CACHE_ENV, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")


@pytest.fixture
def hub(online: None) -> Iterator[LocalHub]:
    local = LocalHub()
    yield local
    local.close()


def _register(
    monkeypatch: pytest.MonkeyPatch, arch: str = "sam_med3d", **fields
) -> KnownCheckpoint:
    """Make ``tiny`` (the test repository's file) the only known checkpoint."""
    entry = KnownCheckpoint("tiny", arch, REPO, FILENAME, "test file", **fields)
    monkeypatch.setattr(weights, "KNOWN_CHECKPOINTS", (entry,))
    return entry


def _download(*args: str | Path) -> Result:
    return CliRunner().invoke(app, ["download", *map(str, args)])


def test_download_checks_caches_and_works_offline(
    hub: LocalHub, checkpoint: bytes, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    entry = _register(monkeypatch)
    hub.add(REPO, FILENAME, checkpoint)
    cache = tmp_path / "cache"
    result = _download("tiny", "--endpoint", hub.url, "--cache", cache, "--json")
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout)
    path = Path(got["path"])
    assert path.read_bytes() == checkpoint and path.is_relative_to(cache)
    assert got["sha256"] == hashlib.sha256(checkpoint).hexdigest()
    assert got["checked_against"] == "the Hub's LFS sha256"
    assert (got["arch"], got["commit"], got["revision"]) == ("sam_med3d", COMMIT, "main")
    assert cached_path(entry, cache) == path

    hub.close()  # from here on any network access would fail
    offline = _download("tiny", "--cache", cache, "--offline", "--json")
    assert offline.exit_code == 0, offline.output
    again = json.loads(offline.stdout)
    assert again["path"] == str(path) and again["sha256"] == got["sha256"]
    assert again["checked_against"] == "the Hub's LFS sha256 recorded in the cache"

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv(CACHE_ENV, str(cache))
    by_env = _download("tiny", "--endpoint", hub.url)
    assert by_env.exit_code == 0, by_env.output
    assert f"--model {path}" in by_env.output and "matches the Hub's LFS sha256" in by_env.output

    listing = CliRunner().invoke(app, ["models"])
    assert listing.exit_code == 0, listing.output
    assert f"tiny: --model {path}" in listing.output


@pytest.mark.parametrize("where", ["pinned", "hub"])
def test_checksum_mismatch_is_refused_and_moved_aside(
    where: str, hub: LocalHub, checkpoint: bytes, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    other = hashlib.sha256(b"another file").hexdigest()
    entry = _register(monkeypatch, **({"sha256": other} if where == "pinned" else {}))
    hub.add(REPO, FILENAME, checkpoint, advertised=None if where == "pinned" else other)
    cache = tmp_path / "cache"
    result = _download("tiny", "--endpoint", hub.url, "--cache", cache)
    assert result.exit_code == 1
    assert "sha256 mismatch" in result.output and f"is {other}" in result.output
    assert "moved aside" in result.output and "Traceback" not in result.output
    if where == "pinned":
        assert "repository changed since fastsam3d pinned it" in result.output
    kept = list(cache.rglob("*.rejected"))
    assert len(kept) == 1 and kept[0].read_bytes() == checkpoint  # kept, not deleted
    assert cached_path(entry, cache) is None  # and no longer offered as good
    offline = _download("tiny", "--cache", cache, "--offline")
    assert offline.exit_code == 1 and "is not in the cache" in offline.output


@pytest.mark.parametrize("case", ["not a checkpoint", "other architecture"])
def test_a_file_that_does_not_load_is_reported(
    case: str, hub: LocalHub, checkpoint: bytes, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    if case == "not a checkpoint":
        _register(monkeypatch)
        hub.add(REPO, FILENAME, b"<html>rate limited</html>" * 40)
        expected = "the checksum matches, but the file does not load as a sam_med3d checkpoint"
    else:
        _register(monkeypatch, arch="fastsam3d")
        hub.add(REPO, FILENAME, checkpoint)
        expected = "loads as sam_med3d, not the expected fastsam3d"
    result = _download("tiny", "--endpoint", hub.url, "--cache", tmp_path / "cache")
    assert result.exit_code == 1 and expected in result.output, result.output


def test_unknown_name_and_missing_file(
    hub: LocalHub, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    unknown = _download("sam_med3d_trubo", "--endpoint", hub.url, "--cache", tmp_path)
    assert unknown.exit_code == 1
    assert "unknown checkpoint 'sam_med3d_trubo'" in unknown.output
    assert "sam_med3d_turbo" in unknown.output and "fastsam3d" in unknown.output
    _register(monkeypatch)  # known here, but the Hub has no such file
    missing = _download("tiny", "--endpoint", hub.url, "--cache", tmp_path)
    assert missing.exit_code == 1
    assert f"{REPO} has no file {FILENAME} at main" in missing.output


def test_no_network_and_no_cache(
    online: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _register(monkeypatch)
    cache = tmp_path / "cache"
    result = _download("tiny", "--endpoint", f"http://127.0.0.1:{port}", "--cache", cache)
    assert result.exit_code == 1 and "Traceback" not in result.output
    tried = f"could not download http://127.0.0.1:{port}/{REPO}/resolve/main/{FILENAME}"
    assert tried in result.output
    for hint in ("--offline", "--endpoint URL", "by hand", "--model PATH"):
        assert hint in result.output
    offline = _download("tiny", "--cache", cache, "--offline")
    assert offline.exit_code == 1 and f"is not in the cache {cache}" in offline.output


def test_without_huggingface_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import now raises ImportError
    result = _download("sam_med3d_turbo")
    assert result.exit_code == 1 and "pip install 'fastsam3d[download]'" in result.output
    listing = CliRunner().invoke(app, ["models"])
    assert listing.exit_code == 0 and "sam_med3d_turbo" in listing.output
