"""One volume, one prompt log: voxel-identical label maps from the Python session, the CLI
(``fastsam3d segment --prompts``), the server (NIfTI upload + replay, and click by click) and the
Slicer logic (remote and local)."""

from __future__ import annotations

import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

pytest.register_assert_rewrite("server_utils")  # it is also loaded as a plugin (below)
from server_utils import make_volume
from typer.testing import CliRunner

from fastsam3d.cli import app
from fastsam3d.client import RemoteSession
from fastsam3d.io.read import load_volume
from fastsam3d.prompts import PromptEvent, PromptLog
from fastsam3d.session import Session

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "slicer_extension" / "FastSAM3D"))
from FastSAM3DLib.logic import FastSAM3DLogicCore, local_backend, remote_backend

pytest_plugins = ["server_utils"]  # the shared `checkpoint` and `server` fixtures
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """The test volume with an oblique affine saved as NIfTI, and a prompt log (RAS mm)."""
    folder = tmp_path_factory.mktemp("agree")
    vol = make_volume()
    c, s = np.cos(0.3), np.sin(0.3)
    affine = np.array(
        [[1.2 * c, -1.5 * s, 0, -30], [1.2 * s, 1.5 * c, 0, 12], [0, 0, -2.0, 90], [0, 0, 0, 1]]
    )
    img = nib.Nifti1Image(vol.array, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    path = folder / "case.nii.gz"
    nib.save(img, path)
    volume = load_volume(path)

    def ras(ijk):
        return (volume.affine @ [*ijk, 1.0])[:3].tolist()

    events = [
        PromptEvent("point", 1, ras((28, 24, 20)), True),
        PromptEvent("point", 1, ras((12, 10, 8)), False),
        PromptEvent("new_object", 2),
        PromptEvent("point", 2, ras((40, 34, 30)), True),
        PromptEvent("undo"),
        PromptEvent("redo"),
    ]
    log = PromptLog(
        volume={"shape": list(volume.shape), "affine": volume.affine.tolist()}, events=events
    )
    log_path = log.save(folder / "log.json")
    return path, volume, log, log_path


def drive(logic: FastSAM3DLogicCore, log: PromptLog) -> None:
    """Play a log through the Slicer logic's own calls (what the widget's buttons do)."""
    for ev in log.events:
        if ev.op == "point":
            logic.add_point(ev.ras, ev.positive, ev.object_id)
        elif ev.op == "new_object":
            assert logic.new_object() == ev.object_id
        else:
            assert getattr(logic, ev.op)()


def test_all_front_ends_agree(case, checkpoint, server, tmp_path):
    path, volume, log, log_path = case
    session = Session(checkpoint, device="cpu")
    session.set_volume(volume)
    session.replay(log)
    expected = session.label_map.copy()
    assert set(np.unique(expected)) == {0, 1, 2}

    out = tmp_path / "cli.nii.gz"
    args = ["segment", str(path), "-o", str(out), "--prompts", str(log_path)]
    result = CliRunner().invoke(app, [*args, "--model", str(checkpoint), "--device", "cpu", "-q"])
    assert result.exit_code == 0, result.output
    np.testing.assert_array_equal(np.asarray(nib.load(out).dataobj), expected)

    with RemoteSession(server) as remote:
        remote.set_volume_file(path)
        remote.replay(log)
        np.testing.assert_array_equal(remote.label_map, expected)
        assert remote.objects == [1, 2]

    array_kji = volume.array.transpose(2, 1, 0)
    for backend in (remote_backend(server), local_backend(str(checkpoint), "cpu")):
        logic = FastSAM3DLogicCore(backend)
        logic.set_volume(array_kji, volume.affine)
        drive(logic, log)
        np.testing.assert_array_equal(logic.labelmap_kji(), expected.transpose(2, 1, 0))
        logic.close()
