"""The unmodified nnInteractive remote client against our server (``--nninteractive-compat``)."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

pytest.register_assert_rewrite("server_utils")  # it is also loaded as a plugin (below)
from server_utils import make_volume

from fastsam3d.io.read import Volume
from fastsam3d.server.nninteractive import box_clicks, decode_array, encode_array, sample_clicks
from fastsam3d.session import Session

pytest_plugins = ["server_utils"]  # the shared `checkpoint` and `server` fixtures
SPACING = [1.2, 1.5, 2.0]


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return make_volume().array[None]  # (C, X, Y, Z) as nnInteractive takes it


@pytest.fixture
def local(checkpoint, image) -> Session:
    """What the same interactions give in process (the compat server's geometry)."""
    session = Session(checkpoint, device="cpu")
    session.set_volume(Volume(image[0], np.diag([*SPACING, 1.0])))
    return session


@pytest.mark.slow
def test_real_client_points_undo_reset(server, image, local):
    from nnInteractive.inference.remote import (
        SessionExpiredError,
        nnInteractiveRemoteInferenceSession,
    )

    remote = nnInteractiveRemoteInferenceSession(server)
    try:
        assert remote.supports_undo and remote.supports_initial_label
        remote.set_image(image, {"spacing": SPACING})
        assert remote.original_image_shape == image.shape
        buffer = np.zeros(image.shape[1:], np.uint8)
        remote.set_target_buffer(buffer)

        remote.add_point_interaction((28, 24, 20), include_interaction=True)
        local.add_point((28, 24, 20))
        np.testing.assert_array_equal(buffer, local.label_map == 1)
        assert buffer.any()

        remote.add_point_interaction((12, 10, 8), include_interaction=False)
        local.add_point((12, 10, 8), positive=False)
        np.testing.assert_array_equal(buffer, local.label_map == 1)

        assert remote.undo() is True
        local.undo()
        np.testing.assert_array_equal(buffer, local.label_map == 1)

        # Queued interactions run on the next prediction.
        remote.add_point_interaction((20, 20, 15), include_interaction=True, run_prediction=False)
        remote._predict()
        local.add_point((20, 20, 15))
        np.testing.assert_array_equal(buffer, local.label_map == 1)

        remote.reset_interactions()
        assert not buffer.any()
        assert remote.undo() is False  # reset forgets the interactions

        seed = np.zeros_like(buffer)
        seed[20:30, 18:28, 12:20] = 1
        remote.add_initial_seg_interaction(seed)
        np.testing.assert_array_equal(buffer, seed)

        scribble = np.zeros_like(buffer)
        scribble[20:34, 22, 18] = 1
        remote.add_scribble_interaction(scribble, include_interaction=True)
        remote.add_bbox_interaction([[15, 40], [12, 36], [18, 19]], include_interaction=True)
        # a box on slice 18 is made as deep as its longer side; the mask stays inside the box
        where = np.argwhere(buffer)
        assert np.all(where.min(0)[:2] >= (15, 12)) and np.all(where.max(0)[:2] <= (39, 35))
        assert where[:, 2].min() < 18 < where[:, 2].max()
        status = remote.lease_status()
        assert status["idle_timeout_seconds"] == 0
    finally:
        remote.close()
    # A released lease is gone: the client's typed error.
    gone = httpx.post(f"{server}/undo", headers={"X-Lease-Token": "not-a-lease"})
    assert gone.status_code == 410
    with pytest.raises(SessionExpiredError):
        from nnInteractive.inference.remote.remote_session import _raise_for_lease_errors

        _raise_for_lease_errors(gone)


def test_malformed_protocol_requests(server):
    lease = httpx.post(f"{server}/claim").json()["lease_token"]
    headers = {"X-Lease-Token": lease}
    assert (
        httpx.post(
            f"{server}/add_point_interaction", headers=headers, json={"coordinates": [1, 2, 3]}
        ).status_code
        == 422
    )
    bad = httpx.post(
        f"{server}/set_image", headers={**headers, "X-Meta": "{}"}, content=b"NNIA garbage"
    )
    assert bad.status_code == 400 and "malformed" in bad.json()["detail"]
    assert (
        httpx.post(
            f"{server}/set_image", headers={**headers, "X-Meta": "{nope"}, content=b""
        ).status_code
        == 422
    )
    image = encode_array(np.zeros((1, 8, 8, 8), np.float32))
    ok = httpx.post(f"{server}/set_image", headers={**headers, "X-Meta": "{}"}, content=image)
    assert ok.status_code == 200
    resp = httpx.post(
        f"{server}/add_bbox_interaction", headers=headers, json={"bbox_coords": [[5, 1]]}
    )
    assert resp.status_code == 422
    resp = httpx.post(
        f"{server}/set_target_buffer", headers=headers, json={"shape": [2, 2, 2], "dtype": "uint8"}
    )
    assert resp.status_code == 422 and "does not match" in resp.json()["detail"]
    assert httpx.post(f"{server}/release", headers=headers).status_code == 200


def test_array_codec_round_trip_and_limits():
    from nnInteractive.inference.remote.serialization import pack_array, unpack_array

    arr = np.arange(2 * 3 * 4 * 5, dtype=np.int16).reshape(2, 3, 4, 5)
    np.testing.assert_array_equal(decode_array(pack_array(arr), 1000), arr)  # theirs -> ours
    np.testing.assert_array_equal(unpack_array(encode_array(arr)), arr)  # ours -> theirs
    with pytest.raises(Exception, match="larger than"):
        decode_array(pack_array(arr), 10)
    with pytest.raises(Exception, match="malformed"):
        decode_array(pack_array(arr)[:-5], 1000)


def test_box_becomes_centre_and_outside_negatives():
    clicks = box_clicks(np.array([[10, 20], [10, 30], [5, 6]]), (64, 64, 64))
    (centre, positive), *negatives = clicks
    assert positive and np.allclose(centre, [14.5, 19.5, 5])
    assert len(negatives) == 4 and not any(p for _, p in negatives)  # flat z: 4 sides
    for point, _ in negatives:
        outside = (point[:2] < [10, 10]) | (point[:2] > [19, 29])
        assert outside.any()
    near_edge = box_clicks(np.array([[0, 10], [0, 10], [0, 10]]), (12, 12, 12))
    assert len(near_edge) == 1 + 3  # the sides beyond the volume are skipped


def test_scribble_and_lasso_sampling():
    lasso = np.zeros((40, 40, 10), bool)
    lasso[5:35, 10:30, 4] = True  # a filled region in one slice
    points = sample_clicks(lasso)
    assert len(points) == 3
    assert np.allclose(points[0][[1, 2]], [19.5, 4], atol=1)  # deepest point first: the middle
    assert all(lasso[tuple(np.round(p).astype(int))] for p in points)
    stroke = np.zeros((40, 40, 10), bool)
    stroke[5:35, 12, 3] = True
    spread = sorted(p[0] for p in sample_clicks(stroke))
    assert spread[0] <= 8 and spread[-1] >= 31  # spread along the stroke
    assert sample_clicks(np.zeros((4, 4, 4), bool)) == []


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Using `httpx` with `starlette.testclient`")
def test_box_without_box_model_is_clicks_and_undoes_as_one():
    """On a model trained without boxes a box becomes clicks (centre + negatives outside); one
    undo reverts them all. (In process: the same app as `fastsam3d serve` builds.)"""
    import json

    import torch
    from fastapi.testclient import TestClient
    from server_utils import SMALL

    from fastsam3d.registry import build_model
    from fastsam3d.server.app import create_app

    torch.manual_seed(0)
    # The released architecture (no box prompts); its sin/cos/sin PE needs sizes divisible by 6.
    model = build_model("fastsam3d", **{**SMALL, "out_chans": 96, "prompt_embed_dim": 96})
    image = make_volume().array[None]
    with TestClient(create_app(model, device="cpu", nninteractive_compat=True)) as client:
        headers = {"X-Lease-Token": client.post("/claim").json()["lease_token"]}
        meta = {"X-Meta": json.dumps({"image_properties": {"spacing": SPACING}})}
        resp = client.post("/set_image", headers={**headers, **meta}, content=encode_array(image))
        assert resp.status_code == 200, resp.text
        box = {"bbox_coords": [[15, 40], [12, 36], [18, 19]], "include_interaction": True}
        resp = client.post("/add_bbox_interaction", headers=headers, json=box)
        assert resp.status_code == 200, resp.text
        assert json.loads(resp.headers["X-Meta"])["ran_prediction"]
        undo = client.post("/undo", headers=headers)
        bbox = json.loads(undo.headers["X-Meta"])["bbox"]
        diff = decode_array(undo.content, 10**7)
        assert diff.shape == tuple(b - a for a, b in bbox) and not diff.any()
        assert json.loads(client.post("/undo", headers=headers).headers["X-Meta"]) == {
            "ran_prediction": False,
            "bbox": None,
        }
