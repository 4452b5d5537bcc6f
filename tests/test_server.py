"""The /v1 server as a real process on 127.0.0.1: life cycle, limits, errors, auth, concurrency,
eviction and the client's recovery."""

from __future__ import annotations

import gzip
import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

pytest.register_assert_rewrite("server_utils")  # it is also loaded as a plugin (below)
from server_utils import UPLOAD_MB, make_volume, running_server
from typer.testing import CliRunner

from fastsam3d.client import RemoteSession
from fastsam3d.errors import PromptError
from fastsam3d.server.auth import resolve_token
from fastsam3d.server.wire import GEOMETRY_HEADER, decode_patch, raw_volume_request

pytest_plugins = ["server_utils"]  # the shared `checkpoint` and `server` fixtures
pytestmark = pytest.mark.slow
TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def volume():
    return make_volume()


def upload(url: str, volume, auth: dict[str, str] | None = None, **params) -> dict:
    body, headers = raw_volume_request(volume.array, volume.affine)
    resp = httpx.post(
        f"{url}/v1/sessions",
        content=body,
        headers={**headers, **(auth or {})},
        params=params,
        timeout=60,
    )
    assert resp.status_code == 201, resp.text
    return resp.json()


def test_session_life_cycle(server, volume):
    health = httpx.get(f"{server}/v1/health").json()
    assert health["status"] == "ok" and health["max_sessions"] == 3
    assert health["device"] == "cpu" and health["dtype"] == "fp32"
    info = upload(server, volume)
    sid = info["session_id"]
    assert info["shape"] == list(volume.shape) and info["crop_spacing"] == 1.5  # the model's
    np.testing.assert_allclose(info["affine"], volume.affine)
    base = f"{server}/v1/sessions/{sid}"
    labels = np.zeros(volume.shape, np.uint16)
    resp = httpx.post(f"{base}/points", json={"point": [28, 24, 20]}, timeout=60)
    assert resp.status_code == 200, resp.text
    edit = resp.json()
    assert edit["changed"] and edit["object_id"] == 1
    box, patch = decode_patch(edit["patch"])
    labels[box] = patch
    assert labels.any()
    # A negative click given in world coordinates (LPS) of the same voxel grid.
    lps = volume.affine @ np.array([10.0, 10.0, 10.0, 1.0])
    lps[:2] *= -1
    resp = httpx.post(
        f"{base}/points",
        json={"point": lps[:3].tolist(), "positive": False, "coords": "lps"},
        timeout=60,
    )
    assert resp.status_code == 200, resp.text
    box, patch = decode_patch(resp.json()["patch"])
    labels[box] = patch
    _full_box, full = decode_patch(httpx.get(f"{base}/labels").json())
    np.testing.assert_array_equal(full, labels)
    # Undo returns the previous state; undo past the start says nothing changed.
    box, patch = decode_patch(httpx.post(f"{base}/undo").json()["patch"])
    labels[box] = patch
    assert httpx.post(f"{base}/undo").json()["changed"]
    nothing = httpx.post(f"{base}/undo").json()
    assert nothing == {**nothing, "changed": False, "patch": None}
    assert httpx.post(f"{base}/redo").json()["changed"]
    obj = httpx.post(f"{base}/objects", json={}).json()
    assert obj == {"object_id": 2, "objects": [1, 2]}
    reset = httpx.post(f"{base}/reset", json={"object_id": 1}).json()
    assert reset["object_id"] == 1
    _, full = decode_patch(httpx.get(f"{base}/labels").json())
    assert not (full == 1).any()
    log = httpx.get(f"{base}/log").json()
    assert [e["op"] for e in log["events"]] == [
        "point",
        "point",
        "undo",
        "undo",
        "redo",
        "new_object",
        "reset",
    ]
    assert httpx.delete(base).status_code == 204
    gone = httpx.get(f"{base}/labels")
    assert gone.status_code == 404 and "upload the volume again" in gone.json()["detail"]


def test_nifti_upload_gzip(server, volume, tmp_path):
    import nibabel as nib

    img = nib.Nifti1Image(volume.array, volume.affine)
    img.set_qform(volume.affine, code=1)
    for body in (img.to_bytes(), gzip.compress(img.to_bytes())):
        resp = httpx.post(f"{server}/v1/sessions", content=body, timeout=60)
        assert resp.status_code == 201, resp.text
        assert resp.json()["shape"] == list(volume.shape)
        np.testing.assert_allclose(resp.json()["affine"], volume.affine, atol=1e-5)
        httpx.delete(f"{server}/v1/sessions/{resp.json()['session_id']}")


@pytest.mark.parametrize(
    ("content", "headers", "status", "words"),
    [
        (b"definitely not nifti" * 30, {}, 400, "not a NIfTI"),
        (gzip.compress(b"\0" * 2000), {}, 400, "NIfTI"),
        (b"\x1f\x8b broken gzip", {}, 400, "gzip"),
        (b"", {}, 400, "empty"),
        (b"\0" * ((UPLOAD_MB + 1) << 20), {}, 413, "limit"),
        (b"\0" * 64, {GEOMETRY_HEADER: "{not json"}, 400, "X-Volume-Geometry"),
        (
            b"\0" * 64,
            {GEOMETRY_HEADER: json.dumps({"shape": [4, 4], "affine": np.eye(4).tolist()})},
            400,
            "three",
        ),
        (
            b"\0" * 64,
            {
                GEOMETRY_HEADER: json.dumps(
                    {"shape": [4, 4, 4], "dtype": "complex64", "affine": np.eye(4).tolist()}
                )
            },
            400,
            "dtype",
        ),
        (
            b"\0" * 64,
            {GEOMETRY_HEADER: json.dumps({"shape": [4, 4, 4], "affine": np.eye(4).tolist()})},
            400,
            "needs 256",
        ),
        (
            b"\0" * 64,
            {GEOMETRY_HEADER: json.dumps({"shape": [200, 200, 200], "affine": np.eye(4).tolist()})},
            413,
            "at most",
        ),
        (
            b"\0" * 16,
            {
                GEOMETRY_HEADER: json.dumps(
                    {"shape": [4, 4, 1], "dtype": "uint8", "affine": np.eye(4).tolist()}
                )
            },
            400,
            "2D",
        ),
    ],
    ids=[
        "text",
        "gzip-not-nifti",
        "bad-gzip",
        "empty",
        "oversize",
        "geometry-json",
        "geometry-2d-shape",
        "dtype",
        "short-data",
        "voxels",
        "one-slice",
    ],
)
def test_bad_uploads_refused(server, content, headers, status, words):
    resp = httpx.post(f"{server}/v1/sessions", content=content, headers=headers, timeout=60)
    assert resp.status_code == status, resp.text
    assert words in resp.json()["detail"]


def test_gzip_bomb_refused(server):
    """A small compressed body that inflates past the voxel limit is stopped while inflating."""
    geometry = {
        "shape": [50, 50, 50],
        "dtype": "float32",
        "affine": np.eye(4).tolist(),
        "compression": "zlib",
    }
    import zlib

    body = zlib.compress(b"\0" * 50 * 50 * 60 * 4 * 2)
    resp = httpx.post(
        f"{server}/v1/sessions", content=body, headers={GEOMETRY_HEADER: json.dumps(geometry)}
    )
    assert resp.status_code == 413, resp.text


def test_bad_requests_refused(server, volume):
    sid = upload(server, volume)["session_id"]
    base = f"{server}/v1/sessions/{sid}"
    cases = [
        ("points", {"content": b"{bad json", "headers": {"content-type": "application/json"}}, 422),
        ("points", {"json": {"point": [1, 2]}}, 422),
        ("points", {"json": {"point": [1, 2, "x"]}}, 422),
        ("points", {"json": {"point": [1, 2, 3], "coords": "ijk"}}, 422),
        ("points", {"json": {"point": [1, 2, 3], "surprise": 1}}, 422),
        ("points", {"json": {"point": [999, 2, 3]}}, 422),
        ("points", {"json": {"point": [1, 2, 3], "object_id": 7}}, 422),
        (
            "masks",
            {
                "json": {
                    "object_id": 1,
                    "mask": {"start": [0, 0, 0], "shape": [2, 2, 2], "bits": "!!"},
                }
            },
            422,
        ),
        ("replay", {"json": {"events": [{"op": "explode"}]}}, 422),
        ("replay", {"json": {"events": [{"op": "point", "ras": "here"}]}}, 422),
        (
            "replay",
            {"json": {"events": [{"op": "point", "ras": [1, 2, 3], "crop_spacing": "x"}]}},
            422,
        ),
    ]
    for path, kw, status in cases:
        resp = httpx.post(f"{base}/{path}", timeout=60, **kw)
        assert resp.status_code == status, (path, kw, resp.text)
        assert isinstance(resp.json()["detail"], str) and resp.json()["detail"]
    body, headers = raw_volume_request(volume.array, volume.affine)
    resp = httpx.post(
        f"{server}/v1/sessions", content=body, headers=headers, params={"crop_spacing": 0}
    )
    assert resp.status_code == 422 and "crop spacing must be" in resp.json()["detail"]
    assert httpx.get(f"{server}/v1/health").status_code == 200  # still alive
    httpx.delete(base)


def test_several_clients_at_once(server, volume):
    """Three clients upload, click twice and read back in parallel; same prompts, same masks."""

    def client_run(_n: int) -> np.ndarray:
        with RemoteSession(server, timeout=120) as remote:
            remote.set_volume(volume)
            remote.add_point((28, 24, 20))
            remote.add_point((12, 10, 8), positive=False)
            return remote.label_map.copy()

    t0 = time.monotonic()
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(client_run, range(3), timeout=240))
    assert time.monotonic() - t0 < 240
    assert results[0].any()
    for other in results[1:]:
        np.testing.assert_array_equal(other, results[0])


def test_same_session_requests_are_ordered(server, volume):
    """Concurrent requests to one session run one at a time: 6 parallel new_object calls get 6
    distinct ids and the log records all of them."""
    sid = upload(server, volume)["session_id"]
    base = f"{server}/v1/sessions/{sid}"

    def new(_n: int) -> int:
        return httpx.post(f"{base}/objects", json={}, timeout=60).json()["object_id"]

    with ThreadPoolExecutor(6) as pool:
        ids = list(pool.map(new, range(6), timeout=60))
    assert sorted(ids) == [2, 3, 4, 5, 6, 7]
    assert [e["op"] for e in httpx.get(f"{base}/log").json()["events"]] == ["new_object"] * 6
    httpx.delete(base)


def test_eviction_404_then_client_recovers(server, volume):
    """With MAX_SESSIONS = 3 sessions allowed, a 4th upload evicts the least recently used; its client gets a
    404 under the hood and transparently re-uploads and replays."""
    remote = RemoteSession(server, timeout=120, crop_spacing=1.25)
    remote.set_volume(volume)
    remote.add_point((28, 24, 20))
    before = remote.label_map.copy()
    evicted = remote.session_id
    others = [upload(server, volume)["session_id"] for _ in range(3)]
    resp = httpx.get(f"{server}/v1/sessions/{evicted}/labels")
    assert resp.status_code == 404 and "evicted" in resp.json()["detail"]
    edit = remote.undo()
    assert remote.recoveries == 1 and remote.session_id != evicted
    assert httpx.get(f"{server}/v1/sessions/{remote.session_id}").json()["crop_spacing"] == 1.25
    assert edit is not None and not remote.label_map.any()
    remote.redo()
    np.testing.assert_array_equal(remote.label_map, before)
    with pytest.raises(PromptError, match="outside"):
        remote.add_point((500, 0, 0))
    remote.close()
    for sid in others:
        httpx.delete(f"{server}/v1/sessions/{sid}")
    assert httpx.get(f"{server}/v1/health").json()["evicted"] >= 1


def test_auth_and_idle_timeout(checkpoint, volume):
    with running_server(
        "--model", str(checkpoint), "--idle-timeout", "2", "--nninteractive-compat", token=TOKEN
    ) as url:
        assert httpx.get(f"{url}/v1/health").status_code == 401
        assert (
            httpx.get(f"{url}/v1/health", headers={"Authorization": "Bearer nope"}).status_code
            == 403
        )
        assert httpx.get(f"{url}/openapi.json").status_code == 401
        auth = {"Authorization": f"Bearer {TOKEN}"}
        assert httpx.get(f"{url}/v1/health", headers=auth).status_code == 200
        body, headers = raw_volume_request(volume.array, volume.affine)
        assert httpx.post(f"{url}/v1/sessions", content=body, headers=headers).status_code == 401
        sid = upload(url, volume, auth)["session_id"]
        time.sleep(3.5)  # idle timeout 2 s; the sweeper runs every second
        assert httpx.get(f"{url}/v1/sessions/{sid}", headers=auth).status_code == 404
        with RemoteSession(url, token=TOKEN) as remote:
            remote.set_volume(volume)
            assert remote.new_object() == 2
        # The nnInteractive protocol obeys the same token (its client sends it as api_key).
        from nnInteractive.inference.remote import nnInteractiveRemoteInferenceSession

        with pytest.raises(httpx.HTTPStatusError, match="403"):
            nnInteractiveRemoteInferenceSession(url, api_key="wrong")
        with nnInteractiveRemoteInferenceSession(url, api_key=TOKEN) as nn_remote:
            assert nn_remote.ping()


def test_non_loopback_needs_token(monkeypatch):
    from fastsam3d.cli import app

    monkeypatch.delenv("FASTSAM3D_TOKEN", raising=False)
    result = CliRunner().invoke(app, ["serve", "--host", "0.0.0.0", "--model", "x.safetensors"])
    assert result.exit_code == 1
    assert "without a token" in result.output
    assert resolve_token("127.0.0.1", None) is None
    assert resolve_token("0.0.0.0", "t") == "t"
    monkeypatch.setenv("FASTSAM3D_TOKEN", "from-env")
    assert resolve_token("10.0.0.5", None) == "from-env"


def test_client_new_volume_ends_previous_session(server, volume):
    with RemoteSession(server) as remote:
        remote.set_volume(volume)
        first = remote.session_id
        remote.set_volume(volume.array[:20], volume.affine)
        second = remote.session_id
        assert httpx.get(f"{server}/v1/sessions/{first}").status_code == 404
        assert remote.label_map.shape == (20, 48, 40)
    assert httpx.get(f"{server}/v1/sessions/{second}").status_code == 404


def test_client_and_slicer_logic_import_without_torch():
    """RemoteSession and the Slicer logic must run in a Python without torch (3D Slicer's)."""
    import subprocess
    import sys
    from pathlib import Path

    logic_dir = Path(__file__).resolve().parents[1] / "slicer_extension" / "FastSAM3D"
    code = (
        "import sys; sys.modules['torch'] = None; "  # any torch import now fails
        f"sys.path.insert(0, {str(logic_dir)!r}); "
        "import fastsam3d.client, FastSAM3DLib.logic; "
        "heavy = {'torch', 'monai', 'fastapi', 'nibabel', 'SimpleITK'} & set(sys.modules); "
        "assert not [m for m in heavy if sys.modules[m] is not None], heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
