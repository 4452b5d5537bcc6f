"""Volume reading / mask writing: agreement with nibabel and SimpleITK, DICOM, bad input."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.spatial.transform import Rotation

from fastsam3d import geometry
from fastsam3d.errors import OutputExistsError, VolumeError
from fastsam3d.io import Volume, list_dicom_series, load_volume
from fastsam3d.io.write import save_dicom_seg, save_mask

READ_SUFFIXES = [".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd"]
WRITE_SUFFIXES = [".nii", ".nii.gz", ".nrrd", ".mha"]


def _ramp(shape=(5, 6, 7)) -> np.ndarray:
    """Distinct value per voxel, so any axis swap or flip shows."""
    return np.arange(np.prod(shape), dtype=np.float32).reshape(shape)


def _library_read(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(array (I, J, K), voxel -> RAS affine) as the format's own library reads ``path``."""
    if path.name.endswith((".nii", ".nii.gz")):
        img = nib.load(path)
        return np.asarray(img.dataobj), img.affine
    img = sitk.ReadImage(str(path))
    arr = sitk.GetArrayFromImage(img).transpose(2, 1, 0)
    aff = geometry.affine_from_lps(img.GetSpacing(), img.GetOrigin(), img.GetDirection())
    return arr, aff


# ---------------------------------------------------------------- reading: every format


@pytest.mark.parametrize("suffix", READ_SUFFIXES)
def test_read_matches_library(suffix, write_image, oblique_affine):
    array = _ramp()
    path = write_image(array, oblique_affine, f"img{suffix}")
    vol = load_volume(path)
    lib_array, lib_affine = _library_read(path)
    assert vol.array.shape == (5, 6, 7) and vol.array.dtype == np.float32
    np.testing.assert_array_equal(vol.array, array)
    np.testing.assert_array_equal(vol.array, lib_array)
    np.testing.assert_allclose(vol.affine, lib_affine, atol=1e-5)
    np.testing.assert_allclose(vol.affine, oblique_affine, atol=1e-5)  # float32 in NIfTI
    np.testing.assert_allclose(vol.spacing, [0.8, 1.3, 2.5], atol=1e-5)
    assert vol.source == str(path)
    assert vol.meta["orientation"] == vol.orientation == geometry.orientation(oblique_affine)
    _, origin, direction = geometry.lps_geometry(vol.affine)
    np.testing.assert_allclose(vol.origin_lps, origin)
    np.testing.assert_allclose(vol.direction_lps, direction)


def test_itk_geometry_properties(write_image):
    """origin_lps / direction_lps are exactly what SimpleITK reports for the file."""
    aff = np.diag([-0.7, 1.2, 3.0, 1.0])
    aff[:3, 3] = [5, 6, 7]
    path = write_image(_ramp(), aff, "img.mha")
    vol = load_volume(path)
    img = sitk.ReadImage(str(path))
    np.testing.assert_allclose(vol.origin_lps, img.GetOrigin())
    np.testing.assert_allclose(vol.direction_lps.ravel(), img.GetDirection())
    np.testing.assert_allclose(vol.spacing, img.GetSpacing())
    assert vol.orientation == "LAS"


def test_real_nifti_sample_geometry(shared_data):
    path = shared_data / "ts_abdomen_ct" / "image.nii.gz"
    vol = load_volume(path)
    ref = nib.load(path)
    assert vol.shape == ref.shape == (122, 101, 112)
    np.testing.assert_allclose(vol.affine, ref.affine)
    assert vol.orientation == "RAS"
    np.testing.assert_array_equal(vol.array[60, 50, 50], np.asarray(ref.dataobj)[60, 50, 50])


def test_4d_channel(write_image):
    array = np.stack([_ramp() + 1000 * c for c in range(3)], axis=-1)
    for suffix in (".nii.gz", ".mha"):
        path = write_image(array, np.eye(4), f"four{suffix}")
        with pytest.raises(VolumeError, match=r"4D image with 3 channels.*channel=0\.\.2") as err:
            load_volume(path)
        assert str(path) in str(err.value)
        np.testing.assert_array_equal(load_volume(path, channel=2).array, array[..., 2])
        with pytest.raises(VolumeError, match="channel=3 is out of range: the image has 3"):
            load_volume(path, channel=3)


def test_4d_with_one_channel_is_3d(write_image):
    path = write_image(_ramp()[..., None], np.eye(4), "one.nii.gz")
    np.testing.assert_array_equal(load_volume(path).array, _ramp())


# ---------------------------------------------------------------- in-memory volumes


def test_volume_from_array_validates():
    vol = Volume(np.ones((4, 5, 6), dtype=np.int16), np.diag([2.0, 2.0, 3.0, 1.0]))
    assert vol.array.dtype == np.float32 and vol.source is None and vol.shape == (4, 5, 6)
    np.testing.assert_allclose(vol.spacing, [2, 2, 3])
    bad = np.ones((4, 5, 6), dtype=np.float32)
    bad[1, 2, 3] = np.inf
    with pytest.raises(
        VolumeError, match=r"in-memory volume: 1 voxels are NaN or Inf .*\(1, 2, 3\)"
    ):
        Volume(bad, np.eye(4))
    with pytest.raises(VolumeError, match="2D image"):
        Volume(np.ones((4, 5, 1)), np.eye(4))
    with pytest.raises(VolumeError, match="spacing .* has a zero"):
        Volume(np.ones((4, 5, 6)), np.diag([1.0, 0.0, 1.0, 1.0]))


# ---------------------------------------------------------------- writing masks


def _labels(shape, seed=0, high=4) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, high, shape).astype(np.uint16)


@st.composite
def geometries(draw) -> np.ndarray:
    """Orthogonal voxel -> RAS affines: oblique rotations, flips, anisotropic spacing."""
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    aff = np.eye(4)
    rot = Rotation.random(random_state=seed).as_matrix() if draw(st.booleans()) else np.eye(3)
    aff[:3, :3] = rot @ np.diag(rng.uniform(0.3, 4.0, 3) * rng.choice([-1, 1], 3))
    aff[:3, 3] = rng.uniform(-200, 200, 3)
    return aff


@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(aff=geometries(), suffix=st.sampled_from(WRITE_SUFFIXES), big=st.booleans())
def test_mask_round_trip_lines_up(aff, suffix, big):
    """A mask written like a volume reads back voxel for voxel, on the same world grid."""
    like = Volume(_ramp((6, 5, 4)), aff)
    mask = _labels(like.shape, high=300 if big else 4)
    with tempfile.TemporaryDirectory() as tmp:
        out = save_mask(mask, like, Path(tmp) / f"mask{suffix}")
        back = load_volume(out)
        lib_array, lib_affine = _library_read(out)
        assert lib_array.dtype == (np.uint16 if big else np.uint8)
    np.testing.assert_array_equal(back.array, mask)
    np.testing.assert_array_equal(lib_array, mask)
    np.testing.assert_allclose(back.affine, aff, atol=1e-4)
    np.testing.assert_allclose(lib_affine, aff, atol=1e-4)
    vox = np.argwhere(mask > 0)[:5]
    np.testing.assert_allclose(
        geometry.from_voxel(vox, "lps", back.affine),
        geometry.from_voxel(vox, "lps", aff),
        atol=1e-3,
    )


def test_save_mask_refuses_overwrite_and_input(tmp_path, write_image):
    src = write_image(_ramp(), np.eye(4), "img.nii.gz")
    like = load_volume(src)
    mask = _labels(like.shape)
    out = save_mask(mask, like, tmp_path / "m.nrrd")
    with pytest.raises(OutputExistsError, match="already exists; pass overwrite=True"):
        save_mask(mask, like, out)
    mask2 = (mask + 1).astype(np.uint8)
    save_mask(mask2, like, out, overwrite=True)
    np.testing.assert_array_equal(load_volume(out).array, mask2)
    before = src.read_bytes()
    with pytest.raises(OutputExistsError, match="refusing to overwrite the input volume"):
        save_mask(mask, like, src, overwrite=True)
    assert src.read_bytes() == before


@pytest.mark.parametrize(
    ("mask", "name", "message"),
    [
        (np.zeros((5, 6, 8), np.uint8), "m.nii.gz", r"mask shape \(5, 6, 8\) differs"),
        (np.zeros((5, 6, 7), np.float32), "m.nii.gz", "integer labels, got dtype float32"),
        (np.full((5, 6, 7), -1, np.int32), "m.nii.gz", "0..65535, got -1..-1"),
        (np.zeros((5, 6, 7), np.uint8), "m.png", "cannot write masks as '.png'"),
        (np.zeros((5, 6, 7), np.uint8), "nowhere/m.nii.gz", "folder .*nowhere does not exist"),
    ],
)
def test_save_mask_bad_requests(tmp_path, mask, name, message):
    like = Volume(_ramp(), np.eye(4))
    with pytest.raises(VolumeError, match=message):
        save_mask(mask, like, tmp_path / name)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_failed_write_leaves_nothing(tmp_path):
    """A real failure at the rename (a folder holds the name) leaves no temp or partial file."""
    like = Volume(_ramp(), np.eye(4))
    (tmp_path / "m.mha").mkdir()
    (tmp_path / "m.mha" / "keep.txt").write_text("x")
    with pytest.raises(VolumeError, match="m.mha: writing failed: a folder has that name"):
        save_mask(_labels(like.shape), like, tmp_path / "m.mha", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.mha"]
    assert (tmp_path / "m.mha" / "keep.txt").read_text() == "x"


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores chmod")
def test_unwritable_folder(tmp_path):
    like = Volume(_ramp(), np.eye(4))
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(VolumeError, match="cannot write in"):
            save_mask(_labels(like.shape), like, folder / "m.nii.gz")
        assert list(folder.iterdir()) == []
    finally:
        folder.chmod(0o700)


# ---------------------------------------------------------------- DICOM


def _stored(shape=(6, 5, 4), seed=1) -> np.ndarray:
    return np.random.default_rng(seed).integers(-500, 1500, shape).astype(np.int16)


@pytest.mark.parametrize(
    ("row_dir", "col_dir", "code"),
    [
        ((1, 0, 0), (0, 1, 0), "LPS"),  # axial
        ((0, 1, 0), (0, 0, -1), "PIR"),  # sagittal: slices step along LPS -x (R)
        ((1, 0, 0), (0, 0, -1), "LIP"),  # coronal: slices step along LPS +y (P)
        (
            tuple(Rotation.from_euler("z", 30, degrees=True).apply([1, 0, 0])),
            tuple(Rotation.from_euler("z", 30, degrees=True).apply([0, 1, 0])),
            None,
        ),  # oblique axial
    ],
)
def test_dicom_series_geometry_and_values(dicom_series, row_dir, col_dir, code):
    stored = _stored()
    folder = dicom_series(
        stored, row_dir=row_dir, col_dir=col_dir, slope=0.5, intercept=-1000, seed=3
    )
    vol = load_volume(folder)
    assert vol.shape == stored.shape
    assert vol.meta["format"] == "dicom" and len(vol.meta["dicom_files"]) == stored.shape[2]
    if code:
        assert vol.orientation == code
    np.testing.assert_allclose(vol.spacing, [0.9, 0.8, 2.5], atol=1e-6)
    np.testing.assert_allclose(vol.direction_lps[:, 0], row_dir, atol=1e-6)
    np.testing.assert_allclose(vol.direction_lps[:, 1], col_dir, atol=1e-6)
    # every file: its position maps to an integer slice whose values are the rescaled pixels
    for name in os.listdir(folder):
        ds = pydicom.dcmread(folder / name)
        k = geometry.to_voxel(ds.ImagePositionPatient, "lps", vol.affine)[0]
        np.testing.assert_allclose(k[:2], 0, atol=1e-4)
        kk = round(float(k[2]))
        assert abs(k[2] - kk) < 1e-4
        expected = ds.pixel_array.astype(np.float64) * 0.5 - 1000
        np.testing.assert_allclose(vol.array[:, :, kk].T, expected)
    # and agrees with SimpleITK's series reader
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder)))
    img = reader.Execute()
    np.testing.assert_allclose(vol.array, sitk.GetArrayFromImage(img).transpose(2, 1, 0))
    np.testing.assert_allclose(vol.origin_lps, img.GetOrigin(), atol=1e-5)


def test_two_series_in_one_folder(dicom_series):
    dicom_series(_stored(seed=1), series_uid="1.2.3.1", description="T1 axial")
    folder = dicom_series(_stored((6, 5, 3), seed=2), series_uid="1.2.3.2", description="CT late")
    (folder / "notes.txt").write_text("not dicom")
    with pytest.raises(VolumeError, match="holds 2 DICOM series") as err:
        load_volume(folder)
    text = str(err.value)
    assert "1.2.3.1" in text and "'T1 axial'" in text and "4 slices" in text
    assert "1.2.3.2" in text and "'CT late'" in text and "3 slices" in text
    assert str(folder) in text
    vol = load_volume(folder, series_uid="1.2.3.2")
    assert vol.shape == (6, 5, 3) and vol.meta["series_description"] == "CT late"
    np.testing.assert_allclose(vol.array, _stored((6, 5, 3), seed=2))
    with pytest.raises(VolumeError, match="no DICOM series with SeriesInstanceUID 9.9"):
        load_volume(folder, series_uid="9.9")
    assert [s.uid for s in list_dicom_series(folder)] == ["1.2.3.2", "1.2.3.1"]


def test_dicom_series_odd_slices(dicom_series):
    """A single-slice series is 2D; a series whose slices differ in size is refused clearly."""
    single = dicom_series(_stored((6, 5, 1)), folder="single")
    with pytest.raises(VolumeError, match="2D image"):
        load_volume(single)
    with pytest.raises(VolumeError, match="single 2D DICOM image; pass the folder"):
        load_volume(next(single.iterdir()))
    folder = dicom_series(_stored(), folder="mixed", series_uid="1.2.3.9")
    dicom_series(_stored((7, 5, 1)), folder="mixed", series_uid="1.2.3.9", origin_lps=(0, 0, 90))
    with pytest.raises(
        VolumeError, match=r"series 1.2.3.9 has 5 slices but only \d share one size"
    ):
        load_volume(folder)


def test_real_dicom_series_matches_nifti_copy(shared_data):
    """The real JPEG 2000 CT series loads as SimpleITK read it into image.nii.gz."""
    folder = shared_data / "ts_ct_dicom_series"
    vol = load_volume(folder / "dicom")
    ref = load_volume(folder / "image.nii.gz")
    assert vol.shape == ref.shape == (512, 512, 20)
    assert vol.orientation == "LPS"
    np.testing.assert_allclose(vol.affine, ref.affine, atol=1e-4)
    np.testing.assert_array_equal(vol.array, ref.array)
    np.testing.assert_allclose(vol.spacing, [0.9765625, 0.9765625, 2.0])


def test_dicom_seg_round_trip(dicom_series, tmp_path):
    folder = dicom_series(
        _stored(), row_dir=(0, 1, 0), col_dir=(0, 0, -1), slope=2, intercept=-1024
    )
    like = load_volume(folder)
    mask = np.zeros(like.shape, np.uint8)
    mask[1:4, 1:3, 1:3] = 3
    mask[4:6, 0:2, 0:2] = 7
    out = save_dicom_seg(mask, like, tmp_path / "seg.dcm", segment_names={3: "liver"})
    ds = pydicom.dcmread(out)
    assert ds.SOPClassUID == pydicom.uid.SegmentationStorage
    assert [s.SegmentLabel for s in ds.SegmentSequence] == ["liver", "label 7"]
    assert ds.StudyInstanceUID == pydicom.dcmread(like.meta["dicom_files"][0]).StudyInstanceUID
    frames = ds.pixel_array.reshape(-1, ds.Rows, ds.Columns)
    back = np.zeros_like(mask)
    for frame, group in zip(frames, ds.PerFrameFunctionalGroupsSequence):
        ipp = group.PlanePositionSequence[0].ImagePositionPatient
        k = round(float(geometry.to_voxel(ipp, "lps", like.affine)[0, 2]))
        number = group.SegmentIdentificationSequence[0].ReferencedSegmentNumber
        back[:, :, k][frame.T > 0] = {1: 3, 2: 7}[number]
    np.testing.assert_array_equal(back, mask)
    with pytest.raises(OutputExistsError):
        save_dicom_seg(mask, like, out)


def test_dicom_seg_refusals(dicom_series, tmp_path, write_image):
    like = load_volume(dicom_series(_stored()))
    with pytest.raises(VolumeError, match="mask is empty"):
        save_dicom_seg(np.zeros(like.shape, np.uint8), like, tmp_path / "seg.dcm")
    nifti = load_volume(write_image(_ramp(), np.eye(4), "img.nii.gz"))
    with pytest.raises(VolumeError, match="DICOM-SEG needs a volume loaded from a DICOM series"):
        save_dicom_seg(np.ones(nifti.shape, np.uint8), nifti, tmp_path / "seg.dcm")
    assert not (tmp_path / "seg.dcm").exists()


def test_dicom_seg_needs_uids(shared_data, tmp_path):
    like = load_volume(shared_data / "ts_ct_dicom_series" / "dicom")
    with pytest.raises(VolumeError, match="has no SOPInstanceUID .*save as .nii.gz"):
        save_dicom_seg(np.ones(like.shape, np.uint8), like, tmp_path / "seg.dcm")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- bad input


def _truncated(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * 0.6)])
    return path


def test_bad_inputs(tmp_path, write_image):
    big = np.random.default_rng(0).normal(size=(24, 24, 24)).astype(np.float32)
    empty = tmp_path / "empty.nii"
    empty.write_bytes(b"")
    junk = tmp_path / "junk.mha"
    junk.write_bytes(os.urandom(400))
    nan = _ramp()
    nan[2, 3, 4] = np.nan
    cases = {
        tmp_path / "missing.nii.gz": "no such file or folder",
        empty: r"the file is empty \(0 bytes\)",
        _truncated(write_image(big, np.eye(4), "cut.nii.gz")): "cannot be read as nifti",
        _truncated(write_image(big, np.eye(4), "cut.nrrd")): "cannot be read as nrrd",
        junk: "cannot be read as metaimage",
        write_image(_ramp((5, 6)), np.eye(4), "flat.nii.gz"): "2D image",
        write_image(_ramp((5, 6, 1)), np.eye(4), "slice.nii.gz"): "2D image",
        write_image(_ramp((5, 6, 1)), np.eye(4), "slice.nrrd"): "2D image",
        write_image(
            nan, np.eye(4), "nan.nii.gz"
        ): r"1 voxels are NaN or Inf \(first at .*\(2, 3, 4\)",
        tmp_path / "picture.png": "unsupported file type '.png'",
    }
    (tmp_path / "picture.png").write_bytes(b"\x89PNG")
    for path, message in cases.items():
        with pytest.raises(VolumeError, match=message) as err:
            load_volume(path)
        assert str(path) in str(err.value)


def test_bad_spacing(tmp_path):
    """Zero voxel size (singular affine) in NIfTI sform, NIfTI pixdim and MetaImage."""
    array = _ramp()
    zero_sform = nib.Nifti1Image(array, np.diag([1.0, 1.0, 1.0, 1.0]))
    hdr = zero_sform.header
    hdr["srow_y"] = [0, 0, 0, 0]
    hdr["sform_code"] = 1
    nib.save(nib.Nifti1Image(array, None, hdr), tmp_path / "zero_sform.nii.gz")
    for value, name in [(0.0, "zero_pixdim.nii"), (-2.0, "negative_pixdim.nii")]:
        img = nib.Nifti1Image(array, np.diag([1.0, 2.0, 3.0, 1.0]))
        img.set_sform(None, code=0)
        nib.save(img, tmp_path / name)
        raw = bytearray((tmp_path / name).read_bytes())
        raw[84:88] = np.float32(value).tobytes()  # pixdim[2]: header offset 76 + 2 * 4
        (tmp_path / name).write_bytes(bytes(raw))
    (tmp_path / "z.raw").write_bytes(array.astype(np.int16).tobytes())
    (tmp_path / "zero.mhd").write_text(
        "ObjectType = Image\nNDims = 3\nDimSize = 5 6 7\nElementSpacing = 1 0 1\n"
        "ElementType = MET_SHORT\nElementDataFile = z.raw\n"
    )
    cases = {
        "zero_sform.nii.gz": r"voxel spacing \[1.0, 0.0, 1.0\] mm has a zero",
        "zero_pixdim.nii": r"pixdim = \[1.0, 0.0, 3.0\] mm \(zero or negative\) and no sform",
        "negative_pixdim.nii": r"pixdim = \[1.0, -2.0, 3.0\] mm",
        "zero.mhd": "Zero-valued spacing is not supported",
    }
    for name, message in cases.items():
        with pytest.raises(VolumeError, match=message):
            load_volume(tmp_path / name)


def test_negative_metaimage_spacing_is_a_flip(tmp_path):
    """ITK reads a negative ElementSpacing as a flipped axis; we follow SimpleITK exactly."""
    (tmp_path / "z.raw").write_bytes(_ramp().astype(np.int16).tobytes(order="F"))
    (tmp_path / "neg.mhd").write_text(
        "ObjectType = Image\nNDims = 3\nDimSize = 5 6 7\nElementSpacing = 1 -2 1\n"
        "ElementType = MET_SHORT\nElementDataFile = z.raw\n"
    )
    vol = load_volume(tmp_path / "neg.mhd")
    lib_array, lib_affine = _library_read(tmp_path / "neg.mhd")
    np.testing.assert_allclose(vol.affine, lib_affine)
    np.testing.assert_array_equal(vol.array, lib_array)
    np.testing.assert_array_equal(vol.array, _ramp())
    np.testing.assert_allclose(vol.spacing, [1, 2, 1])
    assert vol.direction_lps[1, 1] == -1.0


def test_folder_without_dicom(tmp_path):
    (tmp_path / "readme.txt").write_text("hello")
    (tmp_path / "sub").mkdir()
    with pytest.raises(VolumeError, match=r"holds no DICOM image slices"):
        load_volume(tmp_path)
    with pytest.raises(VolumeError, match="series_uid only applies to a folder"):
        load_volume(tmp_path / "readme.txt", series_uid="1.2")


def test_written_mask_has_ordinary_permissions(tmp_path):
    """The temp-then-rename write must not leave an owner-only file behind (mkstemp's 0600)."""
    import os

    from fastsam3d.io import save_mask
    from fastsam3d.sample_data import make_phantom

    volume, label = make_phantom()
    umask = os.umask(0)
    os.umask(umask)
    path = save_mask(label, volume, tmp_path / "mask.nii.gz")
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask


def test_saved_checkpoint_has_ordinary_permissions(tmp_path):
    """safetensors replaces the temp file it writes to; the result must still follow the umask."""
    import os

    from fastsam3d.checkpoint import save_safetensors
    from fastsam3d.registry import build_model

    model = build_model("fastsam3d_dilated", img_size=32, embed_dim=32, num_heads=2, depth=3,
                        out_chans=32, prompt_embed_dim=32, sparse_group=2)  # fmt: skip
    umask = os.umask(0)
    os.umask(umask)
    path = save_safetensors(model, tmp_path / "m.safetensors")
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask
