"""Checkpoint formats: official .pth layouts, safety, arch inference, our safetensors, convert."""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from fastsam3d.checkpoint import save_safetensors
from fastsam3d.cli import app
from fastsam3d.errors import CheckpointError, OutputExistsError, PromptError
from fastsam3d.registry import build_model, list_architectures

SMALL = {"embed_dim": 48, "out_chans": 24, "prompt_embed_dim": 48, "decoder_mlp_dim": 64}
TEACHER = {**SMALL, "depth": 3, "global_attn_indexes": (2,)}


def _official_pth(path: Path, sd: dict, **extra: object) -> Path:
    """Write a file the way the official trainers do (dict + argparse.Namespace under args)."""
    args = argparse.Namespace(model_type="vit_b_ori", checkpoint="ckpt/sam_med3d.pth", lr=8e-4)
    torch.save({"epoch": 3, "model_state_dict": sd, "args": args, **extra}, path)
    return path


def _same_weights(a: torch.nn.Module, b: torch.nn.Module, prefix: str = "") -> None:
    sa, sb = a.state_dict(), b.state_dict()
    keys = [k for k in sa if k.startswith(prefix)]
    assert keys and all(torch.equal(sa[k], sb[k]) for k in keys)


@pytest.fixture(scope="module")
def student() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("fastsam3d", **SMALL)


@pytest.fixture(scope="module")
def teacher() -> torch.nn.Module:
    torch.manual_seed(1)
    return build_model("sam_med3d", **TEACHER)


def test_official_combined_pth_infers_the_student(student: torch.nn.Module, tmp_path: Path) -> None:
    path = _official_pth(tmp_path / "fastsam3d.pth", student.state_dict())
    model = build_model(checkpoint=path)
    assert model.config.arch == "fastsam3d"
    assert model.config.block_kinds() == ("mlp", "mlp", "global", "global", "global", "global")
    assert (model.config.embed_dim, model.config.num_heads, model.config.prompt_embed_dim) == (
        48,
        6,
        48,
    )
    _same_weights(model, student)


def test_teacher_is_recognised_from_its_tables(teacher: torch.nn.Module, tmp_path: Path) -> None:
    model = build_model(checkpoint=_official_pth(tmp_path / "turbo.pth", teacher.state_dict()))
    cfg = model.config
    assert (cfg.arch, cfg.window_size, cfg.global_attn_indexes, cfg.num_heads) == (
        "sam_med3d",
        14,
        (2,),
        12,
    )
    assert not cfg.fs3d_block_order
    _same_weights(model, teacher)


def test_encoder_only_student_with_teacher_decoder(
    student: torch.nn.Module, teacher: torch.nn.Module, tmp_path: Path
) -> None:
    enc = {k.removeprefix("image_encoder."): v for k, v in student.state_dict().items()}
    enc = {k: v for k, v in enc.items() if not k.startswith(("prompt_encoder", "mask_decoder"))}
    enc_path = _official_pth(tmp_path / "student_enc.pth", enc, used_datas=["ct_x"])
    dec_path = _official_pth(tmp_path / "turbo.pth", teacher.state_dict())
    with pytest.raises(CheckpointError, match="decoder_checkpoint"):
        build_model(checkpoint=enc_path)
    model = build_model(checkpoint=enc_path, decoder_checkpoint=dec_path)
    _same_weights(model, student, "image_encoder.")
    _same_weights(model, teacher, "mask_decoder.")
    _same_weights(model, teacher, "prompt_encoder.")


def test_module_prefix_and_explicit_variant(student: torch.nn.Module, tmp_path: Path) -> None:
    path = tmp_path / "ddp.pth"
    torch.save({"module." + k: v for k, v in student.state_dict().items()}, path)
    model = build_model("fastsam3d_sparse", checkpoint=path)
    assert model.config.attention == "official_sparse"
    assert model.config.embed_dim == 48  # sizes still come from the file
    _same_weights(model, student)


def test_other_pickled_classes_are_refused(student: torch.nn.Module, tmp_path: Path) -> None:
    path = _official_pth(
        tmp_path / "evil.pth", student.state_dict(), when=datetime.date(2024, 1, 1)
    )
    with pytest.raises(CheckpointError, match=r"refusing to load.*datetime"):
        build_model(checkpoint=path)


def test_mismatch_lists_keys_and_describes_the_file(
    student: torch.nn.Module, tmp_path: Path
) -> None:
    sd = dict(student.state_dict())
    del sd["mask_decoder.iou_token.weight"]
    sd["mask_decoder.extra.weight"] = torch.zeros(2)
    path = _official_pth(tmp_path / "broken.pth", sd)
    with pytest.raises(CheckpointError) as err:
        build_model(checkpoint=path)
    msg = str(err.value)
    assert "missing keys (1): mask_decoder.iou_token.weight" in msg
    assert "unexpected keys (1): mask_decoder.extra.weight" in msg
    assert "looks like: FastSAM3D-like model: 6 blocks (2 MLP-only), width 48" in msg


def test_shape_mismatch_against_stored_config(student: torch.nn.Module, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    path = save_safetensors(student, tmp_path / "ours.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    sd = load_file(path)
    sd["mask_decoder.iou_token.weight"] = torch.zeros(1, 7)
    save_file(sd, path, metadata=meta)
    with pytest.raises(CheckpointError, match=r"shape mismatches \(1\): mask_decoder.iou_token"):
        build_model(checkpoint=path)


def test_not_a_checkpoint(tmp_path: Path) -> None:
    bad = tmp_path / "notes.pth"
    bad.write_text("hello")
    with pytest.raises(CheckpointError, match="notes.pth"):
        build_model(checkpoint=bad)
    with pytest.raises(CheckpointError, match="not found"):
        build_model(checkpoint=tmp_path / "missing.pth")


@pytest.mark.parametrize(("dtype", "tol"), [("fp32", 0.0), ("fp16", 1e-3), ("int8", 2e-2)])
def test_safetensors_roundtrip(dtype: str, tol: float, tmp_path: Path) -> None:
    torch.manual_seed(2)
    ours = build_model("fastsam3d_dilated", depth=4, **SMALL)
    path = save_safetensors(ours, tmp_path / f"m_{dtype}.safetensors", dtype=dtype)
    loaded = build_model(checkpoint=path)
    assert loaded.config == ours.config
    for (k, a), b in zip(ours.state_dict().items(), loaded.state_dict().values()):
        assert b.dtype == a.dtype, k
        assert torch.allclose(a, b, atol=tol * max(a.abs().max().item(), 1.0)), k
    with pytest.raises(OutputExistsError):
        save_safetensors(ours, path)
    save_safetensors(ours, path, overwrite=True)


def test_convert_cli(student: torch.nn.Module, tmp_path: Path) -> None:
    src = _official_pth(tmp_path / "fastsam3d.pth", student.state_dict())
    out = tmp_path / "fastsam3d.safetensors"
    result = CliRunner().invoke(app, ["convert", str(src), str(out)])
    assert result.exit_code == 0, result.output
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
    assert json.loads(meta["config"])["arch"] == "fastsam3d"
    result = CliRunner().invoke(app, ["convert", str(src), str(out)])
    assert result.exit_code == 1 and "exists" in result.output


def test_boxes_only_where_the_config_has_corner_embeddings() -> None:
    box = torch.tensor([[[10.0, 20.0, 30.0], [50.0, 60.0, 70.0]]])
    points = (torch.tensor([[[30.0, 40.0, 50.0]]]), torch.tensor([[1]]))
    official = build_model("fastsam3d", **SMALL)
    assert not official.config.accepts_boxes
    with pytest.raises(PromptError, match="box"):
        official.prompt_encoder(points=points, boxes=box, masks=None)
    ours = build_model("fastsam3d_dilated", **SMALL)
    assert ours.config.accepts_boxes
    sparse, dense = ours.prompt_encoder(points=points, boxes=box, masks=None)
    assert sparse.shape == (1, 3, 48) and dense.shape == (1, 48, 8, 8, 8)
    sparse, _ = ours.prompt_encoder(points=None, boxes=box, masks=None)
    assert sparse.shape == (1, 2, 48)


def test_architectures_listed() -> None:
    names = [name for name, _ in list_architectures()]
    assert {"fastsam3d", "fastsam3d_sparse", "sam_med3d", "fastsam3d_dilated"} <= set(names)
