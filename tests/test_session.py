"""Session semantics: clicks, embedding reuse, undo/redo, several objects, re-cropping, replay."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastsam3d.errors import PromptError
from fastsam3d.io.read import Volume
from fastsam3d.prompts import PromptLog
from fastsam3d.registry import build_model
from fastsam3d.session import Session


def _tiny_model(seed: int = 0, **config) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(
        "fastsam3d_dilated", embed_dim=48, depth=3, num_heads=3, out_chans=32,
        prompt_embed_dim=32, **config,
    )  # fmt: skip


def _constant_model(sign: float, **config) -> torch.nn.Module:
    """A real model whose decoder is set to output logits of one sign everywhere: a predictable
    object (the whole crop, or nothing) for testing tiling and stitching."""
    model = _tiny_model(**config)
    dec = model.mask_decoder
    with torch.no_grad():
        up = dec.output_upscaling[-2]  # last ConvTranspose3d (then GELU)
        up.weight.zero_()
        up.bias.fill_(1.0)
        for mlp in dec.output_hypernetworks_mlps:
            last = mlp.layers[-1]
            last.weight.zero_()
            last.bias.fill_(sign)
    return model


@pytest.fixture(scope="module")
def tiny_model():
    return _tiny_model()


def _volume(shape=(48, 40, 36), spacing=2.0, seed=0) -> Volume:
    rng = np.random.default_rng(seed)
    arr = rng.normal(100, 10, size=shape).astype(np.float32)
    arr[10:30, 10:30, 10:30] += 200  # a bright cube
    aff = np.diag([spacing, spacing, spacing, 1.0])
    aff[:3, 3] = (-40.0, -30.0, 20.0)
    return Volume(arr, aff)


def test_refinement_reuses_the_embedding(tiny_model):
    s = Session(tiny_model, device="cpu")
    s.set_volume(_volume())
    s.add_point((20, 20, 20))
    calls = s.predictor.encoder_calls
    s.add_point((22, 18, 21), positive=False)
    s.add_point((18, 21, 19))
    assert s.predictor.encoder_calls == calls  # same crop: prompt encoder + decoder only
    assert s.log.events[-1].op == "point" and len(s.clicks()) == 3


def test_undo_redo_restore_label_map_and_prompts(tiny_model):
    s = Session(tiny_model, device="cpu")
    s.set_volume(_volume())
    s.add_point((20, 20, 20))
    first = s.label_map.copy()
    s.add_point((25, 25, 25), positive=False)
    second = s.label_map.copy()
    edit = s.undo()
    assert np.array_equal(s.label_map, first) and len(s.clicks()) == 1
    assert np.array_equal(s.label_map[edit.bbox], edit.patch)
    s.redo()
    assert np.array_equal(s.label_map, second) and len(s.clicks()) == 2
    s.undo(), s.undo()
    assert not s.label_map.any()
    assert s.undo() is None  # nothing left


def test_undo_keeps_only_the_changed_voxels(tiny_model):
    """A step stores the voxels it changed, not two copies of its box; a long undo / redo
    walk through two objects restores every label map exactly."""
    s = Session(tiny_model, device="cpu")
    s.set_volume(_volume())
    maps = [s.label_map.copy()]
    for point, positive, new in [((20, 20, 20), True, False), ((25, 25, 25), False, False),
                                 ((12, 30, 14), True, True), ((22, 19, 21), True, False)]:  # fmt: skip
        if new:
            s.new_object()
            maps.append(s.label_map.copy())
        s.add_point(point, positive=positive)
        maps.append(s.label_map.copy())
        step = s._undo[-1]
        changed = int((maps[-1] != maps[-2]).sum())
        assert len(step.index) == len(step.before) == len(step.after) == changed
    for expected in reversed(maps[:-1]):
        s.undo()
        assert np.array_equal(s.label_map, expected)
    for expected in maps[1:]:
        s.redo()
        assert np.array_equal(s.label_map, expected)


def test_objects_never_overwrite_each_other():
    s = Session(_constant_model(+1.0), device="cpu")  # every click claims its whole crop
    s.set_volume(_volume())
    s.add_point((10, 10, 10))
    one = s.label_map == 1
    assert one.all()  # the crop (128 x 1.5 mm) covers this small volume
    two = s.new_object()
    s.add_point((30, 30, 30), object_id=two)
    assert np.array_equal(s.label_map == 1, one)  # object 1 is protected
    assert not (s.label_map == 2).any()
    s.reset(1)  # voxels object 1 gives up return to object 2, which predicted them
    assert (s.label_map == 2).all()


def test_unprotected_session_lets_the_new_object_win():
    s = Session(_constant_model(+1.0), device="cpu", protect=False)
    s.set_volume(_volume())
    s.add_point((10, 10, 10))
    s.add_point((30, 30, 30), object_id=s.new_object())
    assert (s.label_map == 2).all()


def test_large_object_is_tiled_and_stitched_without_seams():
    # 300 mm along i: more than one 192 mm crop; the object fills everything.
    vol = _volume(shape=(200, 30, 30), spacing=1.5)
    s = Session(_constant_model(+1.0), device="cpu", max_new_tiles=6)
    s.set_volume(vol)
    edit = s.add_point((100, 15, 15))
    assert edit.tiles == 3  # centre tile + one neighbour on each side along i
    assert (s.label_map == 1).all()


def test_tile_growth_is_off_by_default():
    s = Session(_constant_model(+1.0), device="cpu")
    s.set_volume(_volume(shape=(200, 30, 30), spacing=1.5))
    assert s.add_point((100, 15, 15)).tiles == 1  # cut at the crop until the user clicks beyond


def test_a_grown_tile_must_agree_with_its_parent_in_the_overlap():
    vol = _volume(shape=(200, 30, 30), spacing=1.5)
    s = Session(_constant_model(+1.0), device="cpu", max_new_tiles=6)
    s.grow_agreement = 1.01  # no neighbour can agree this well: none is kept
    s.set_volume(vol)
    edit = s.add_point((100, 15, 15))
    assert edit.tiles == 1
    assert not (s.label_map == 1).all()  # the object stays cut at the one crop


def test_tiling_is_bounded():
    vol = _volume(shape=(400, 30, 30), spacing=1.5)  # 600 mm
    s = Session(_constant_model(+1.0), device="cpu", max_new_tiles=1)
    s.set_volume(vol)
    assert s.add_point((200, 15, 15)).tiles == 2


def test_click_outside_an_object_tile_opens_a_new_tile():
    vol = _volume(shape=(300, 30, 30), spacing=1.5)
    s = Session(_constant_model(-1.0), device="cpu")  # empty masks: no automatic tiling
    s.set_volume(vol)
    assert s.add_point((20, 15, 15)).tiles == 1
    assert s.add_point((280, 15, 15)).tiles == 2
    assert s.predictor.encoder_calls == 2


def test_bad_prompts_raise_clear_errors(tiny_model):
    s = Session(tiny_model, device="cpu")
    s.set_volume(_volume())
    with pytest.raises(PromptError, match="outside"):
        s.add_point((100, 5, 5))
    with pytest.raises(PromptError, match="object 7 does not exist"):
        s.add_point((5, 5, 5), object_id=7)
    official = build_model(
        "fastsam3d", embed_dim=48, num_heads=6, out_chans=32, prompt_embed_dim=48
    )
    s2 = Session(official, device="cpu")
    s2.set_volume(_volume())
    with pytest.raises(PromptError, match="box"):
        s2.add_box((5, 5, 5), (20, 20, 20))
    assert not s.label_map.any()  # nothing was changed by the failed calls


def test_world_coordinates_select_the_same_voxel(tiny_model):
    vol = _volume()
    voxel = np.array([20.0, 12.0, 9.0])
    ras = (vol.affine @ np.r_[voxel, 1])[:3]
    lps = ras * np.array([-1, -1, 1])
    masks = []
    for point, coords in ((voxel, "voxel"), (ras, "ras"), (lps, "lps")):
        s = Session(tiny_model, device="cpu")
        s.set_volume(vol)
        s.add_point(point, coords=coords)
        masks.append(s.label_map.copy())
    assert np.array_equal(masks[0], masks[1]) and np.array_equal(masks[0], masks[2])


def test_prompt_log_replays_exactly(tiny_model, tmp_path):
    vol = _volume()
    s = Session(tiny_model, device="cpu")
    s.set_volume(vol)
    s.add_point((20, 20, 20))
    s.add_point((24, 20, 20), positive=False)
    s.undo()
    s.redo()
    s.crop_spacing = 1.0  # recorded with the clicks: the replay runs them at it
    s.add_point((5, 30, 8), object_id=s.new_object())
    start = np.zeros(vol.shape, bool)
    start[2:6, 2:6, 2:6] = True
    s.set_mask(s.new_object(), start)
    path = s.log.save(tmp_path / "log.json")
    replayed = Session(tiny_model, device="cpu")
    replayed.set_volume(vol)
    replayed.replay(PromptLog.load(path))
    assert np.array_equal(replayed.label_map, s.label_map)
    assert replayed.objects == s.objects == [1, 2, 3] and replayed.crop_spacing == 1.0


def test_set_mask_starts_an_object_and_a_click_refines_it(tiny_model):
    s = Session(tiny_model, device="cpu")
    s.set_volume(_volume())
    start = np.zeros(s.label_map.shape, bool)
    start[10:30, 10:30, 10:30] = True
    s.set_mask(1, start)
    assert np.array_equal(s.label_map == 1, start)
    s.add_point((20, 20, 20))
    assert s.predictor.encoder_calls == 1


def test_untrained_model_is_never_presented_as_a_model():
    from fastsam3d.predictor import load_predictor

    _, name = load_predictor("untrained", "cpu")
    assert name.startswith("UNTRAINED") and "random weights" in name


def test_new_object_is_undoable(tiny_model):
    s = Session(tiny_model, device="cpu")
    s.set_volume(_volume())
    s.add_point((20, 20, 20))
    first = s.label_map.copy()
    assert s.new_object() == 2 and s.active_object == 2
    s.undo()
    assert s.objects == [1] and s.active_object == 1
    assert np.array_equal(s.label_map, first)  # the click before it is untouched
    s.redo()
    assert s.objects == [1, 2] and s.active_object == 2


def test_an_edit_covers_exactly_the_voxels_that_changed(tiny_model):
    s = Session(tiny_model, device="cpu")
    s.set_volume(_volume())
    s.add_point((20, 20, 20))
    before = s.label_map.copy()
    edit = s.add_point((12, 25, 18), positive=False)
    diff = np.argwhere(before != s.label_map)
    lo = np.array([sl.start for sl in edit.bbox])
    hi = np.array([sl.stop for sl in edit.bbox])
    if len(diff):
        assert (diff.min(0) >= lo).all() and (diff.max(0) < hi).all()
        # the box is the changed voxels' own box, not the whole tile
        assert (lo == diff.min(0)).all() and (hi == diff.max(0) + 1).all()
    else:
        assert (hi - lo).prod() == 0


def test_a_lone_first_click_takes_the_multimask_output_of_highest_iou():
    """A model trained with ``finetune --multimask`` answers a first click with the one of its 4
    outputs of highest predicted IoU; later clicks use the single output."""
    from fastsam3d.predictor import Predictor
    from fastsam3d.training.loop import start_multimask_from_single

    class Recording(Predictor):
        def predict(self, *args, **kwargs):
            out = super().predict(*args, **kwargs)
            self.calls.append((kwargs["multimask"], out))
            return out

    model = _tiny_model()
    start_multimask_from_single(model)
    with torch.no_grad():  # make the outputs differ, the last the most confident
        model.mask_decoder.iou_prediction_head.layers[-1].bias += torch.tensor([0, -1, 0, 1.0])
        model.mask_decoder.output_hypernetworks_mlps[3].layers[-1].bias += 0.5
    pred = Recording(model, "cpu")
    pred.calls = []
    s = Session(pred)
    s.set_volume(_volume())
    s.add_point((20, 20, 20))
    s.add_point((24, 20, 20), positive=False)
    (first, (low, iou)), (later, (_, iou2)) = pred.calls
    assert first == "all" and iou.shape == (1, 4) and int(iou.argmax()) == 3
    assert not later and iou2.shape == (1, 1)
    s.reset()
    s.add_point((20, 20, 20))
    torch.testing.assert_close(s._objects[1].tiles[0].logits, low[:, 3:4])


def test_a_box_bounds_its_object_until_a_positive_click_lands_outside():
    """The model's mask (here the whole crop) is cut to the object's box, negative clicks
    keep the bound, a positive click outside the box lifts it; a new box replaces the object's
    old mask, also where the old one lies outside the new box's tile; a box drawn on one slice
    is made as deep as its longer side."""
    s = Session(_constant_model(1.0, num_point_embeddings=4), device="cpu")
    s.set_volume(_volume(shape=(120, 40, 36)))  # 240 mm along i: more than one 192 mm crop
    s.add_point((10, 20, 18))
    assert s.mask()[:40].any()
    box = ((100, 12, 14), (110, 22, 24))
    s.add_box(*box)
    inside = np.zeros(s.label_map.shape, bool)
    inside[100:111, 12:23, 14:25] = True
    assert np.array_equal(s.mask(), inside)
    s.add_point((105, 15, 15), positive=False)
    assert np.array_equal(s.mask(), inside)
    s.add_point((80, 30, 30))
    assert s.mask()[80, 30, 30] and s.mask().sum() > inside.sum()
    s.undo()
    assert np.array_equal(s.mask(), inside)
    s.add_box((100, 12, 20), (110, 22, 20))  # on slice 20: made 20 mm (10 voxels) deep
    inside[:] = False
    inside[100:111, 12:23, 15:26] = True
    assert np.array_equal(s.mask(), inside)


def test_crops_take_the_models_spacing_and_a_box_is_seen_whole():
    """A click's crop has the model's crop spacing (1.0 mm for the bundled model) unless the
    session sets another; a box too large for such a crop gets a coarser one, up to the
    training's 1.5 mm, so that the model sees it whole."""
    torch.manual_seed(0)
    model = build_model(
        "fastsam3d_dilated", embed_dim=48, depth=3, num_heads=3, out_chans=32,
        prompt_embed_dim=32, num_point_embeddings=4, crop_spacing_mm=1.0,
    )  # fmt: skip
    s = Session(model, device="cpu")
    s.set_volume(_volume(spacing=4.0))  # 192 x 160 x 144 mm
    s.add_point((20, 20, 20))
    assert s.crop_spacing == 1.0 and s._objects[1].tiles[-1].grid.spacing == 1.0

    def box_crop(hi: tuple[int, int, int]) -> float:
        s.add_box((2, 2, 2), hi)
        return s._objects[s.active_object].tiles[-1].grid.spacing

    assert box_crop((20, 20, 20)) == 1.0  # 72 mm: fits inside a 128 mm crop's margins
    assert box_crop((32, 32, 32)) == pytest.approx(120 / 112)  # just fits at that spacing
    assert box_crop((47, 39, 35)) == 1.5  # 180 mm: as large as the training spacing allows
    assert Session(model, device="cpu", crop_spacing=1.5).crop_spacing == 1.5
    assert Session(_tiny_model(), device="cpu").crop_spacing == 1.5  # the official models'
    with pytest.raises(PromptError, match="crop spacing"):
        Session(model, device="cpu", crop_spacing=0.0)
