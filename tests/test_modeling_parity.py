"""Parity with the official FastSAM3D / SAM-Med3D modules (fixtures in shared/reference, SPEC §14).

Reduced-width models (128^3 input, 8^3 tokens) built from the fixtures' constructor settings
run on CPU in fp32 and must reproduce every stored output within 1e-4 (the fp16-path outputs
within ``TOL16``), and the 128^3 binary masks exactly except where |logit| < 1e-4.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from fastsam3d.registry import build_from_config, build_model, get_config

REF = Path(__file__).resolve().parents[1].parent / "shared" / "reference"
TOL32 = 1e-4
TOL16 = 2e-3  # fp16 rounding is emulated; SPEC allows ~5e-3 without emulation
# The same fp16 casts as the fixtures: one fp16 rounding step flips where the fp32 matmul before
# it differs in the last bits, which another CPU's BLAS kernels do (AVX2: <= 1e-4; an AVX-512
# Xeon: 1.9e-4 in the embedding, 2.5e-4 in the decoder's logits).
TOL16_MATH = 5e-4

if not REF.is_dir():
    if os.environ.get("CI"):
        raise RuntimeError(
            f"parity fixtures missing: {REF} (CI must provide shared/ beside the repo)"
        )
    pytest.skip(f"parity fixtures not found at {REF}", allow_module_level=True)

STUDENT = {"embed_dim": 96, "out_chans": 48, "prompt_embed_dim": 48}
TEACHER = {
    "embed_dim": 96,
    "depth": 3,
    "global_attn_indexes": (2,),
    "out_chans": 48,
    "prompt_embed_dim": 48,
}
INPUTS = {"image_int8", "image_scale", "points_r1", "labels_r1", "points_r2", "labels_r2"}
INPUTS |= {"mask_input_r1", "sparse_token_order"}
PREFIXES = ("sparse32_", "sparse16_", "flashdec32_", "flashdec16_", "fs3dcode_")


def _model(arch: str, weights: str, **overrides: object) -> torch.nn.Module:
    model = build_model(arch, **overrides)
    model.load_state_dict(load_file(REF / weights))
    return model


def _image(z: np.lib.npyio.NpzFile) -> torch.Tensor:
    return torch.from_numpy(z["image_int8"].astype(np.float32) * z["image_scale"])[None, None]


@torch.no_grad()
def _decode(model: torch.nn.Module, emb: torch.Tensor, z: np.lib.npyio.NpzFile) -> dict:
    """Prompt encoder + decoder for rounds r1, r1nomask, r2 (SPEC §14 prompts)."""
    pe_mod = model.prompt_encoder
    out = {"image_pe": pe_mod.get_dense_pe()}
    rounds = [
        ("r1", "points_r1", "labels_r1", torch.zeros(1, 1, 32, 32, 32)),
        ("r1nomask", "points_r1", "labels_r1", None),
        ("r2", "points_r2", "labels_r2", "r1"),
    ]
    for name, pts, lbl, mask in rounds:
        if mask == "r1":
            mask = out["r1_low_res_single"]
        points = (torch.from_numpy(z[pts]), torch.from_numpy(z[lbl]))
        sparse, dense = pe_mod(points=points, boxes=None, masks=mask)
        out[f"{name}_sparse"], out[f"{name}_dense"] = sparse, dense
        for kind, multi in (("single", False), ("multi", True)):
            low, iou = model.mask_decoder(emb, out["image_pe"], sparse, dense, multi)
            out[f"{name}_low_res_{kind}"], out[f"{name}_iou_{kind}"] = low, iou
        up = F.interpolate(
            out[f"{name}_low_res_single"], size=(128,) * 3, mode="trilinear", align_corners=False
        )
        out[f"{name}_up128_slice64"] = up[:, :, 64]
        out[f"{name}_up128"] = up
    return out


def _compare(ours: dict, z: np.lib.npyio.NpzFile, prefix: str = "", tol: float = TOL32) -> dict:
    """Check every stored output with ``prefix`` (all of them must be computed); return errors."""
    expected = [
        k
        for k in z.files
        if k.startswith(prefix)
        and not k.endswith("packbits")
        and k not in INPUTS
        and (prefix or not k.startswith(PREFIXES))
    ]
    missing = [k for k in expected if k[len(prefix) :] not in ours]
    assert not missing, f"outputs not computed: {missing}"
    errors = {
        k: (ours[k[len(prefix) :]].float() - torch.from_numpy(z[k])).abs().max().item()
        for k in expected
    }
    bad = {k: v for k, v in errors.items() if v > tol}
    assert not bad, f"outputs beyond {tol}: {bad}"
    return errors


def _check_masks(ours: dict, z: np.lib.npyio.NpzFile) -> None:
    for r in ("r1", "r2"):
        ref = np.unpackbits(z[f"{r}_mask128_packbits"])[: 128**3].reshape(1, 1, 128, 128, 128)
        up = ours[f"{r}_up128"].numpy()
        ambiguous = np.abs(up) < 1e-4
        mismatch = ((up > 0) != ref.astype(bool)) & ~ambiguous
        assert not mismatch.any(), f"{r}: {mismatch.sum()} mask voxels differ"


@pytest.fixture(scope="module")
def student_io() -> np.lib.npyio.NpzFile:
    return np.load(REF / "student_io.npz")


@pytest.fixture(scope="module")
def teacher_io() -> np.lib.npyio.NpzFile:
    return np.load(REF / "teacher_io.npz")


@pytest.fixture(scope="module")
def student_outputs(student_io: np.lib.npyio.NpzFile) -> tuple[torch.nn.Module, dict]:
    model = _model("fastsam3d", "student.safetensors", **STUDENT)
    with torch.no_grad():
        x = _image(student_io)
        out = {"encoder_list0": model.image_encoder.embed_tokens(x)}
        emb, blocks = model.image_encoder(x, return_blocks=True)
    out.update({f"block{i}_out": b for i, b in enumerate(blocks)}, image_embedding=emb)
    out.update(_decode(model, emb, student_io))
    return model, out


def test_fixture_settings_match_registry() -> None:
    """The reduced fixtures differ from the full-size registry configs only in the sizes."""
    s = json.loads((REF / "student.json").read_text())["image_encoder_kwargs"]
    t = json.loads((REF / "teacher.json").read_text())["image_encoder_kwargs"]
    cs, ct = get_config("fastsam3d", **STUDENT), get_config("sam_med3d", **TEACHER)
    assert (cs.depth, cs.num_heads, cs.mlp_only_blocks) == (s["depth"], s["num_heads"], 2)
    assert (ct.depth, ct.num_heads, ct.window_size) == (t["depth"], t["num_heads"], 14)
    assert cs.block_kinds() == ("mlp", "mlp", "global", "global", "global", "global")
    assert ct.block_kinds() == ("window", "window", "global")


def test_student_parity(student_outputs: tuple, student_io: np.lib.npyio.NpzFile) -> None:
    _, out = student_outputs
    _compare(out, student_io)
    _check_masks(out, student_io)


# The fixtures' flash-attn stand-in computes softmax((q*scale) k^T) v in fp32 on fp16-rounded
# inputs: our "math" backend reproduces the fp16 outputs up to BLAS-dependent rounding flips,
# SDPA within fp16 rounding.
SPARSE_CASES = [
    ("sparse32_", False, "sdpa", TOL32),
    ("sparse16_", True, "math", TOL16_MATH),
    ("sparse16_", True, "sdpa", TOL16),
]


@pytest.mark.parametrize(("prefix", "fp16", "backend", "tol"), SPARSE_CASES)
def test_sparse_student_parity(
    prefix: str, fp16: bool, backend: str, tol: float, student_io: np.lib.npyio.NpzFile
) -> None:
    model = _model(
        "fastsam3d_sparse", "student.safetensors", fp16_rounding=fp16, backend=backend, **STUDENT
    )
    with torch.no_grad():
        emb, blocks = model.image_encoder(_image(student_io), return_blocks=True)
    out = {f"block{i}_out": b for i, b in enumerate(blocks)} | {"image_embedding": emb}
    out.update(_decode(model, emb, student_io))
    _compare(out, student_io, prefix, tol)


def test_sparse_token_order(student_io: np.lib.npyio.NpzFile) -> None:
    """The official recomposition: output position p carries token ``sparse_token_order[p]``."""
    attn = build_model("fastsam3d_sparse", **STUDENT).image_encoder.blocks[2].attn
    qkv = torch.zeros(1, 512, 3, attn.num_heads, attn.head_dim)
    # q = k = a large one-hot of the member index t // 64: each token attends only to itself
    member = torch.nn.functional.one_hot(torch.arange(512) // 64, attn.head_dim).float() * 100
    qkv[:, :, 0] = qkv[:, :, 1] = member[None, :, None, :]
    qkv[:, :, 2] = torch.arange(512, dtype=torch.float32)[None, :, None, None]
    out = attn._official_sparse(qkv.reshape(1, 8, 8, 8, 3, attn.num_heads, attn.head_dim))
    order = torch.from_numpy(student_io["sparse_token_order"]).float()
    assert torch.allclose(out[..., 0].reshape(-1), order)


FLASHDEC_CASES = [
    ("flashdec32_", False, "sdpa", TOL32),
    ("flashdec16_", True, "math", TOL16_MATH),
    ("flashdec16_", True, "sdpa", TOL16),
]


@pytest.mark.parametrize(("prefix", "fp16", "backend", "tol"), FLASHDEC_CASES)
def test_flash_decoder_parity(
    prefix: str,
    fp16: bool,
    backend: str,
    tol: float,
    student_io: np.lib.npyio.NpzFile,
) -> None:
    """Flash decoder on the stored dense embedding (fp16 rounding amplifies input noise)."""
    model = _model(
        "fastsam3d",
        "student.safetensors",
        flash_decoder=True,
        fp16_rounding=fp16,
        backend=backend,
        **STUDENT,
    )
    out = _decode(model, torch.from_numpy(student_io["image_embedding"]), student_io)
    _compare(out, student_io, prefix, tol)


def test_teacher_parity(teacher_io: np.lib.npyio.NpzFile) -> None:
    model = _model("sam_med3d", "teacher.safetensors", **TEACHER)
    with torch.no_grad():
        emb, blocks = model.image_encoder(_image(teacher_io), return_blocks=True)
    out = {f"block{i}_out": b for i, b in enumerate(blocks)} | {"image_embedding": emb}
    out.update(_decode(model, emb, teacher_io))
    _compare(out, teacher_io)
    _check_masks(out, teacher_io)


def test_teacher_weights_fs3d_order(teacher_io: np.lib.npyio.NpzFile) -> None:
    """FastSAM3D's encoder class on the teacher weights = our teacher with fs3d block order."""
    model = _model("sam_med3d", "teacher.safetensors", fs3d_block_order=True, **TEACHER)
    with torch.no_grad():
        x = _image(teacher_io)
        emb, blocks = model.image_encoder(x, return_blocks=True)
        list0 = model.image_encoder.embed_tokens(x)
    out = {"encoder_list0": list0, "encoder_list1": blocks[1], "encoder_list2": emb}
    out["image_embedding"] = emb
    _compare(out, teacher_io, "fs3dcode_")


@pytest.mark.parametrize(
    ("arch", "keys_file"),
    [
        ("fastsam3d", "student_full_keys.json"),
        ("fastsam3d_sparse", "student_full_keys.json"),
        ("sam_med3d", "teacher_full_keys.json"),
    ],
)
def test_full_size_state_dict_layout(arch: str, keys_file: str) -> None:
    """Full-size models (built on the meta device) have exactly the official keys and shapes."""
    ref = json.loads((REF / keys_file).read_text())
    with torch.device("meta"):
        model = build_from_config(get_config(arch))
    sd = model.state_dict()
    assert list(sd) == list(ref["keys"])
    assert {k: list(v.shape) for k, v in sd.items()} == ref["keys"]
    assert sum(v.numel() for v in sd.values()) == ref["n_elements"]
    for part, n in ref["params"].items():
        got = sum(p.numel() for p in getattr(model, part).parameters())
        assert got == n, part
