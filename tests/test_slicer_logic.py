"""The Slicer module's logic (no Slicer needed) end to end against a real server: the bundled
sample uploaded as Slicer holds it ((k, j, i) array + IJK-to-RAS), clicks in RAS, and the
labelmap equals voxel for voxel what the in-process session gives."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "slicer_extension" / "FastSAM3D"))
from FastSAM3DLib.logic import (
    FastSAM3DLogicCore,
    remote_backend,
    to_slicer,
    volume_from_slicer,
)

from fastsam3d.sample_data import load_sample
from fastsam3d.session import Session

pytest_plugins = ["server_utils"]  # the shared `checkpoint` and `server` fixtures


def test_transposes():
    kji = np.arange(2 * 3 * 4).reshape(2, 3, 4)  # Slicer: 2 slices, 3 rows, 4 columns
    affine = np.diag([0.5, 0.6, 2.0, 1.0])
    ijk, aff = volume_from_slicer(kji, affine)
    assert ijk.shape == (4, 3, 2) and ijk[3, 1, 0] == kji[0, 1, 3]
    np.testing.assert_array_equal(to_slicer(ijk), kji)
    np.testing.assert_array_equal(aff, affine)
    with pytest.raises(ValueError, match="3D"):
        volume_from_slicer(kji[0], affine)


@pytest.mark.slow
def test_logic_against_server_matches_in_process_session(server, checkpoint):
    volume, labels, names = load_sample()
    liver = next(v for v, n in names.items() if n == "liver")
    seed = np.argwhere(labels == liver).mean(0).round()
    clicks_ras = [
        (volume.affine @ [*seed, 1.0])[:3],  # what a markup point in the liver reports
        (volume.affine @ [*(seed + [0, 0, -12]), 1.0])[:3],
    ]

    # Slicer's view of the volume: arrayFromVolume is (k, j, i); IJK-to-RAS is the NIfTI affine.
    array_kji = volume.array.transpose(2, 1, 0).copy()
    logic = FastSAM3DLogicCore(remote_backend(server))
    logic.set_volume(array_kji, volume.affine)
    reference = Session(checkpoint, device="cpu")
    reference.set_volume(volume)
    try:
        for ras, positive in zip(clicks_ras, (True, False)):
            assert logic.add_point(ras, positive) == 1
            reference.add_point(ras, positive, coords="ras")
            out = logic.labelmap_kji()
            assert out.shape == array_kji.shape
            np.testing.assert_array_equal(out, reference.label_map.transpose(2, 1, 0))
        assert (logic.mask_kji(1) == 1).any()
        assert logic.undo()
        reference.undo()
        np.testing.assert_array_equal(logic.labelmap_kji(), reference.label_map.transpose(2, 1, 0))
        assert logic.new_object() == 2 and logic.objects == [1, 2]
    finally:
        logic.close()
