"""The fast paths compute what the float32 eager reference computes (no timings here).

* exact rewrites (patch embedding as a matrix product, separable resampling): allclose;
* approximate paths (bf16 autocast, int8 encoder, onnxruntime): masks Dice >= 0.99 against
  the float32 eager masks, on the bundled default weights when they are installed; the small
  random-weight model's logits sit near zero almost everywhere, so there the bound is 0.98;
* CUDA graphs: identical masks (runs only where a GPU is).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import warnings

import numpy as np
import pytest
import torch

import fastsam3d.transforms as tr
from fastsam3d.bench import ClickRunner, dice, launched_ops, synthetic_crop
from fastsam3d.modeling.image_encoder import PatchEmbed3D
from fastsam3d.predictor import Predictor
from fastsam3d.registry import build_model
from fastsam3d.weights import default_checkpoint

SMALL = {"embed_dim": 48, "depth": 3, "num_heads": 3, "out_chans": 32, "prompt_embed_dim": 32}


def _small_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("fastsam3d_dilated", **SMALL)


def _models():
    yield pytest.param(_small_model, 0.98, id="small-random")
    ckpt = default_checkpoint()
    yield pytest.param(
        (lambda: build_model(checkpoint=ckpt)) if ckpt else None,
        0.99,
        id="default-weights",
        marks=[
            pytest.mark.slow,
            pytest.mark.skipif(ckpt is None, reason="no bundled default weights"),
        ],
    )


def _masks(predictor: Predictor) -> tuple[torch.Tensor, torch.Tensor]:
    crop, click = synthetic_crop()
    runner = ClickRunner(predictor, crop, click)
    first = runner.first().cpu()
    return first, runner.refine().cpu()


@pytest.mark.parametrize(("factory", "bound"), list(_models()))
@pytest.mark.parametrize("options", [{"dtype": "bf16"}, {"quantize": "int8"}], ids=str)
def test_fast_paths_keep_the_masks(factory, bound, options):
    ref = _masks(Predictor(factory(), "cpu"))
    got = _masks(Predictor(factory(), "cpu", **options))
    assert ref[0].sum() > 1000  # a real object, not an empty mask
    for a, b in zip(got, ref):
        assert dice(a, b) >= bound


def test_int8_leaves_the_callers_model_float():
    model = _small_model()
    pred = Predictor(model, "cpu", quantize="int8")
    assert type(model.image_encoder.blocks[0].mlp.lin1) is torch.nn.Linear
    assert pred.model.image_encoder is not model.image_encoder


def test_cpu_bf16_without_bf16_units_warns(monkeypatch):
    """Emulated bfloat16 is far slower than fp32: a CPU without AMX / AVX512-BF16 says so."""
    from fastsam3d import predictor

    monkeypatch.setattr(predictor, "cpu_bf16_units", list)
    with pytest.warns(RuntimeWarning, match="no bfloat16 matrix units"):
        Predictor(_small_model(), "cpu", dtype="bf16")
    monkeypatch.setattr(predictor, "cpu_bf16_units", lambda: ["AMX"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        Predictor(_small_model(), "cpu", dtype="bf16")


def test_cpu_bf16_stores_the_encoders_matrix_weights_in_a_copy():
    """On the CPU, bf16 keeps the image encoder's Linear and convolution weights in bfloat16
    (no per-call casts) and its norms in float32; of the click path only the decoder's output
    upscaling convolutions are bfloat16 (fixed shapes), and the caller's model is left
    float32."""
    model = _small_model()
    pred = Predictor(model, "cpu", dtype="bf16")
    block = pred.model.image_encoder.blocks[0]
    assert block.mlp.lin1.weight.dtype == torch.bfloat16
    assert pred.model.image_encoder.patch_embed.proj.weight.dtype == torch.bfloat16
    assert block.norm2.weight.dtype == torch.float32
    decoder = pred.model.mask_decoder
    assert decoder.output_upscaling[0].weight.dtype == torch.bfloat16
    assert decoder.output_upscaling[1].weight.dtype == torch.float32  # its LayerNorm
    assert decoder.transformer.layers[0].mlp.lin1.weight.dtype == torch.float32
    assert pred.model.prompt_encoder is model.prompt_encoder
    assert all(p.dtype == torch.float32 for p in model.parameters())
    shared = pred.share().model  # the server's sessions share one bf16 copy
    assert shared.image_encoder is pred.model.image_encoder
    assert shared.mask_decoder is decoder
    from fastsam3d.server.app import session_factory

    make, base, _ = session_factory(model, "cpu", "bf16")
    assert base.dtype == "bf16"
    assert make().predictor.model.image_encoder is base.model.image_encoder


def test_upscaling_equals_the_sequential_convolutions_after_weight_updates():
    """The patch-order upscaling keeps its permuted weights between clicks; changing a weight
    in place (an optimiser step, ``load_state_dict``) must be seen by the next click."""
    decoder = _small_model().mask_decoder.eval()
    src = torch.randn(1, 8**3, decoder.transformer_dim)
    hyper = torch.randn(1, 1, decoder.transformer_dim // 8)

    def check() -> None:
        with torch.inference_mode():
            fast = decoder._upscale_masks(src, hyper, (8, 8, 8))
            grid = src.transpose(1, 2).reshape(1, -1, 8, 8, 8)
            feats = decoder.output_upscaling(grid).flatten(2)  # (1, C/8, 32^3)
            ref = (hyper @ feats).reshape(1, 1, 32, 32, 32)
        torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-4)

    check()
    with torch.no_grad():
        decoder.output_upscaling[0].weight.mul_(-2.0)
        decoder.output_upscaling[3].weight.add_(0.5)
    check()


def test_predict_mask_is_the_upsampled_thresholded_predict():
    p = Predictor(_small_model(), "cpu")
    crop, click = synthetic_crop()
    p.set_image(crop)
    pts, lbl = torch.tensor(np.stack([click, click + 3]), dtype=torch.float32), torch.tensor([1, 0])
    low, iou = p.predict(pts, lbl)
    low2, iou2, mask = p.predict_mask(pts, lbl)
    torch.testing.assert_close((low2, iou2), (low, iou))
    assert mask.dtype == torch.bool and mask.shape == (1, 1, 128, 128, 128)
    assert torch.equal(mask, tr.upsample_logits(low, 128) > 0)


@pytest.mark.parametrize(("torch_threads", "expected"), [(1, 1), (2, 1), (4, 3), (8, 7)])
def test_click_threads_leave_one_core_free(torch_threads, expected):
    """The default click runs on one thread fewer than torch's (the GUI and other processes
    keep a core, so OpenMP barriers do not stall), and never on none; explicit values stay."""
    before = torch.get_num_threads()
    torch.set_num_threads(torch_threads)
    try:
        assert Predictor(_small_model(), "cpu").click_threads == expected
        assert Predictor(_small_model(), "cpu", click_threads=2).click_threads == 2
        assert Predictor(_small_model(), "cpu", click_threads=None).click_threads is None
    finally:
        torch.set_num_threads(before)


def test_patch_embedding_matmul_equals_the_convolution():
    torch.manual_seed(0)
    embed = PatchEmbed3D(16, 1, 64)
    x = torch.randn(2, 1, 64, 48, 40)
    ref = embed.proj(x).permute(0, 2, 3, 4, 1)
    torch.testing.assert_close(embed.matmul_forward(x), ref, rtol=1e-5, atol=1e-5)


def _axis_aligned_affine(seed: int) -> np.ndarray:
    """Scaling, flips and a 3-cycle or swap of axes (what the separable path must handle)."""
    rng = np.random.default_rng(seed)
    perm = [(1, 2, 0), (2, 0, 1), (0, 2, 1), (0, 1, 2)][seed % 4]
    aff = np.eye(4)
    aff[:3, :3] = 0
    for col, row in enumerate(perm):
        aff[row, col] = rng.choice([-1, 1]) * rng.uniform(0.6, 3.0)
    aff[:3, 3] = rng.uniform(-50, 50, 3)
    return aff


@pytest.mark.parametrize("seed", range(4))
def test_separable_resampling_equals_grid_sample(seed, monkeypatch):
    aff = _axis_aligned_affine(seed)
    shape = (60, 50, 40)
    rng = np.random.default_rng(seed)
    vol = torch.from_numpy(rng.normal(size=shape).astype(np.float32))
    center = (aff @ np.array([30, 25, 20, 1.0]))[:3] + rng.uniform(-3, 3, 3)
    grid = tr.CropGrid.around(center, spacing=1.5, size=32)
    low = torch.randn(1, 1, 8, 8, 8)
    fast = (
        tr.sample_crop(vol, aff, grid),
        tr.crop_logits_to_native(low, grid, aff, shape),
        tr.crop_logits_to_native(tr.upsample_logits(low, 32), grid, aff, shape),
    )
    monkeypatch.setattr(tr, "_axis_permutation", lambda linear: None)  # the 3D grid_sample path
    slow = (
        tr.sample_crop(vol, aff, grid),
        tr.crop_logits_to_native(tr.upsample_logits(low, 32), grid, aff, shape),
    )
    torch.testing.assert_close(fast[0], slow[0], rtol=0, atol=1e-4)
    for got in fast[1:]:
        assert got[0] == slow[1][0]  # same native box
        torch.testing.assert_close(got[1], slow[1][1], rtol=0, atol=1e-4)
        assert torch.equal(got[2], slow[1][2])  # same voxels inside the cube
        assert got[2].any()


def test_onnx_matches_torch(tmp_path):
    pytest.importorskip("onnxruntime")
    from fastsam3d.export import OnnxPredictor, export_onnx

    model = _small_model()
    export_onnx(model, tmp_path)
    crop, click = synthetic_crop()
    ref_p, ort_p = Predictor(model, "cpu"), OnnxPredictor(tmp_path)
    ref_p.set_image(crop)
    ort_p.set_image(crop.numpy())
    box = np.stack([click - 12, click + 10]).astype(np.float32)
    prompts = [
        (click[None], [1], None),
        (np.stack([click, click + 9, click - 7]), [1, 0, 1], None),
        (None, None, box),  # a box alone, then a box with clicks
        (np.stack([click, click + 9]), [1, 0], box),
    ]
    for pts, lbl, bx in prompts:
        mask = torch.randn(1, 1, 32, 32, 32)
        t_pts = None if pts is None else torch.tensor(pts).float()
        t_lbl = None if lbl is None else torch.tensor(lbl)
        t_box = None if bx is None else torch.from_numpy(bx)
        ref, ref_iou = ref_p.predict(t_pts, t_lbl, box=t_box, mask_input=mask)
        got, got_iou = ort_p.predict(pts, lbl, box=bx, mask_input=mask.numpy())
        np.testing.assert_allclose(got, ref.numpy(), atol=1e-4)
        np.testing.assert_allclose(got_iou, ref_iou.numpy(), atol=1e-4)
        assert dice(torch.from_numpy(got) > 0, ref > 0) >= 0.99


def test_onnx_first_click_graph_of_a_multimask_model(tmp_path):
    """A model with ``first_click_multimask`` exports a second decoder graph with all 4 outputs,
    which the onnxruntime predictor answers a lone first click from, as torch does; the
    model's crop spacing travels with the export."""
    pytest.importorskip("onnxruntime")
    from fastsam3d.export import OnnxPredictor, export_onnx
    from fastsam3d.training.loop import start_multimask_from_single

    model = _small_model()
    model.config = dataclasses.replace(model.config, crop_spacing_mm=1.0)
    start_multimask_from_single(model)
    with torch.no_grad():
        model.mask_decoder.iou_prediction_head.layers[-1].bias += torch.tensor([0, 1.0, -1, 0])
    export_onnx(model, tmp_path)
    crop, click = synthetic_crop()
    ref_p, ort_p = Predictor(model, "cpu"), OnnxPredictor(tmp_path)
    assert ref_p.first_click_multimask and ort_p.first_click_multimask
    assert ref_p.crop_spacing_mm == ort_p.crop_spacing_mm == 1.0
    ref_p.set_image(crop)
    ort_p.set_image(crop.numpy())
    zeros = torch.zeros(1, 1, 32, 32, 32)  # a session's first-click mask prompt
    for multimask in (False, "all"):
        ref, ref_iou = ref_p.predict(
            torch.tensor(click[None]).float(), [1], mask_input=zeros, multimask=multimask
        )
        got, got_iou = ort_p.predict(
            click[None], [1], mask_input=zeros.numpy(), multimask=multimask
        )
        assert got.shape == tuple(ref.shape) and got_iou.shape == (1, 4 if multimask else 1)
        np.testing.assert_allclose(got, ref.numpy(), atol=1e-4)
        np.testing.assert_allclose(got_iou, ref_iou.numpy(), atol=1e-4)
    with pytest.raises(ValueError, match="single output only"):  # the 3 alone: not exported
        ort_p.predict(click[None], [1], mask_input=zeros.numpy(), multimask=True)


def test_session_runs_on_the_onnx_folder(tmp_path):
    """A Session given an export-onnx folder runs onnxruntime (CPU) with the embedding cache,
    and its masks are the torch session's, from clicks and from a box; wrong or outdated
    folders are readable errors."""
    pytest.importorskip("onnxruntime")
    from fastsam3d.errors import CheckpointError, FastSAM3DError
    from fastsam3d.export import OnnxPredictor, export_onnx
    from fastsam3d.sample_data import make_phantom
    from fastsam3d.session import Session

    model = _small_model()
    export_onnx(model, tmp_path / "onnx")
    volume, _ = make_phantom()
    clicks = [((30, 30, 20), True), ((34, 30, 20), True), ((30, 40, 20), False)]
    maps = []
    for spec in (model, tmp_path / "onnx"):
        session = Session(spec, device="cpu", max_new_tiles=0)
        session.set_volume(volume)
        for point, positive in clicks:
            session.add_point(point, positive=positive)
        maps.append(session.label_map.copy())
        session.add_box((20, 20, 10), (40, 40, 30), object_id=session.new_object())
        maps.append(session.label_map.copy())
    assert isinstance(session.predictor, OnnxPredictor)
    assert session.model_name == "onnx (onnxruntime)"
    assert session.predictor.encoder_calls == 1  # nearby clicks reuse the cached embedding
    for torch_map, onnx_map in zip(maps[:2], maps[2:]):  # after the clicks, after the box
        assert (onnx_map == torch_map).mean() >= 0.99
        assert dice(torch.from_numpy(onnx_map == 1), torch.from_numpy(torch_map == 1)) >= 0.98
    meta = tmp_path / "onnx" / "onnx_meta.json"
    old = tmp_path / "old"
    shutil.copytree(tmp_path / "onnx", old)
    (old / meta.name).write_text(json.dumps({**json.loads(meta.read_text()), "format": 1}))
    with pytest.raises(FastSAM3DError, match="older fastsam3d .* run fastsam3d export-onnx again"):
        Session(old, device="cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="without encoder.onnx"):
        Session(tmp_path / "empty", device="cpu")
    with pytest.raises(CheckpointError, match="float32 only"):
        Session(tmp_path / "onnx", device="cpu", dtype="bf16")
    # the server's factory: sessions share the onnxruntime sessions, each with its own cache
    from fastsam3d.server.app import session_factory

    make, base, name = session_factory(tmp_path / "onnx", "cpu")
    first, second = make(), make()
    assert first.predictor._encoder is base._encoder is second.predictor._encoder
    first.set_volume(volume)
    first.add_point(clicks[0][0])
    assert first.predictor.encoder_calls == 1 and second.predictor.encoder_calls == 0
    assert name == "onnx (onnxruntime)" and first.label_map.any()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graphs_give_the_eager_masks():
    """Also: a graph copies the image embedding in again only when another one comes."""
    ref = _masks(Predictor(_small_model(), "cuda"))
    crop, click = synthetic_crop()
    for mode in ("cudagraphs", "inductor-graphs"):
        p = Predictor(_small_model(), "cuda", compile=mode)
        got = _masks(p)
        for a, b in zip(got, ref):
            assert dice(a, b) >= 0.999, mode
        p.set_image(crop, key="a")
        first = p.predict_mask(torch.tensor(click[None]), torch.tensor([1]))[0]
        p.set_image(-crop, key="b")  # another embedding through the same graph
        other = p.predict_mask(torch.tensor(click[None]), torch.tensor([1]))[0]
        p.set_image(key="a")
        again = p.predict_mask(torch.tensor(click[None]), torch.tensor([1]))[0]
        assert torch.equal(first, again) and not torch.equal(first, other), mode


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="dtype"):
        Predictor(_small_model(), "cpu", dtype="fp8")
    for mode in ("cudagraphs", "inductor-graphs"):
        with pytest.raises(ValueError, match="CUDA"):
            Predictor(_small_model(), "cpu", compile=mode)
    with pytest.raises(ValueError, match="compile must be"):
        Predictor(_small_model(), "cpu", compile="tensorrt")
    with pytest.raises(ValueError, match="pick one"):
        Predictor(_small_model(), "cpu", quantize="int8", dtype="bf16")


def _paste_case(
    aff: np.ndarray, kind: str, seed: int
) -> tuple[tuple[int, int, int], tr.CropGrid, torch.Tensor]:
    """A (60, 50, 40) volume, a 32^3 crop at 1.5 mm in its middle and 8^3 low-res logits:
    negative but for a blob, one voxel (sparse), two faces (edge), mostly or all positive
    (all: random signs; none: nothing positive)."""
    center = (aff @ np.array([30, 25, 20, 1.0]))[:3]
    grid = tr.CropGrid.around(center, spacing=1.5, size=32)
    gen = torch.Generator().manual_seed(seed)
    low = -1.0 - torch.rand(1, 1, 8, 8, 8, generator=gen)
    if kind == "blob":
        low[..., 2:5, 3:6, 1:4] = torch.randn(3, 3, 3, generator=gen) + 0.5
    elif kind == "sparse":
        low[..., 7, 0, 4] = 2.0
    elif kind == "edge":  # positive on the crop's faces, where sampling clamps to the border
        low[..., 0, :, :] = 1.0
        low[..., :, :, 7] = 1.0
    elif kind == "all":
        low = torch.randn(1, 1, 8, 8, 8, generator=gen)
    elif kind == "mostly":
        low = torch.randn(1, 1, 8, 8, 8, generator=gen) + 1.0
    elif kind == "ones":  # the whole cube: only blocks on its faces are sampled
        low = torch.ones(1, 1, 8, 8, 8)
    return (60, 50, 40), grid, low


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("kind", ["blob", "sparse", "none", "all", "oblique"])
def test_pasted_mask_equals_the_thresholded_logits(seed, kind, oblique_affine):
    """paste_crop_mask writes crop_logits_to_native(...) > 0 where the crop covers the canvas,
    keeps the canvas elsewhere, and sets True only inside the box it returns."""
    aff = oblique_affine if kind == "oblique" else _axis_aligned_affine(seed)
    shape, grid, low = _paste_case(aff, "blob" if kind == "oblique" else kind, seed)
    bbox, values, inside = tr.crop_logits_to_native(low, grid, aff, shape)
    # a canvas that overlaps the crop's box only in part, already holding other voxels
    rng = np.random.default_rng(seed)
    origin = np.array([s.start for s in bbox]) + rng.integers(-6, 7, 3)
    canvas = torch.from_numpy(rng.random(tuple(rng.integers(20, 45, 3))) < 0.3)
    before = canvas.clone()
    box = tr.paste_crop_mask(canvas, origin, low, grid, aff, shape)
    expected = before.clone()
    full = torch.zeros(shape, dtype=torch.bool)
    full_inside = torch.zeros(shape, dtype=torch.bool)
    full[bbox], full_inside[bbox] = values > 0, inside
    end = origin + np.asarray(canvas.shape)
    a, b = np.maximum(origin, 0), np.minimum(end, shape)
    dst = tuple(slice(x - o, y - o) for x, y, o in zip(a, b, origin))
    src = tuple(slice(x, y) for x, y in zip(a, b))
    expected[dst] = torch.where(full_inside[src], full[src], before[dst])
    assert torch.equal(canvas, expected)
    new = canvas & ~before
    if box is None:
        assert not new.any()
    else:
        outside = new.clone()
        outside[tuple(slice(x - o, y - o) for x, y, o in zip(*box, origin))] = False
        assert not outside.any()


def test_launched_ops_counts_work_not_views() -> None:
    """The benchmark's launch count (the GPU's per-kernel overhead is what the click's time is
    made of): a refinement launches fewer operations than a first click, which adds the encoder;
    a pure view launches none."""
    runner = ClickRunner(Predictor(_small_model(), "cpu"), *synthetic_crop())
    runner.first()
    cpu = torch.device("cpu")
    encoder, first, refine = (
        launched_ops(f, cpu) for f in (runner.encoder, runner.first, runner.refine)
    )
    assert 0 < refine < first and 0 < encoder < first
    x = torch.zeros(4, 4)
    assert launched_ops(lambda: x.t().reshape(16)[None], cpu) == 0


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("kind", ["blob", "sparse", "edge", "mostly", "ones", "none"])
def test_oblique_paste_on_an_empty_canvas_maps_only_what_the_logits_reach(
    seed, kind, oblique_affine
):
    """An oblique crop pasted where the canvas holds nothing yet samples only the voxels its
    positive low-res logits reach, blocks of voxels at a time (all-positive blocks inside the
    cube without sampling): the same mask as thresholding the whole box (up to a voxel whose
    logit rounds across 0 with the sub-box's sampling positions)."""
    shape, grid, low = _paste_case(oblique_affine, kind, seed)
    bbox, values, inside = tr.crop_logits_to_native(low, grid, oblique_affine, shape)
    expected = torch.zeros(shape, dtype=torch.bool)
    expected[bbox] = (values > 0) & inside
    canvas = torch.zeros(shape, dtype=torch.bool)
    box = tr.paste_crop_mask(canvas, np.zeros(3, int), low, grid, oblique_affine, shape)
    assert (box is None) == (kind == "none")
    assert torch.count_nonzero(canvas != expected) <= 2
    if kind != "none":
        assert expected.any()
