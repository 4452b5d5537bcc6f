"""Safe checkpoint loading and saving.

Files read (never executing pickled code):

* our ``.safetensors`` (below);
* official ``.pth`` files through ``torch.load(weights_only=True)`` with exactly one extra
  class allow-listed, ``argparse.Namespace`` (the official trainers pickle their arguments
  under ``args``): a bare state dict, or a dict holding it under ``model_state_dict``
  (SAM-Med3D / turbo, the combined FastSAM3D file of the Slicer extension), or the
  encoder-only FastSAM3D student (keys without the ``image_encoder.`` prefix; its prompt
  encoder and decoder come from ``decoder_checkpoint``, as in the official validation).
  A ``module.`` prefix (DataParallel/DDP) is stripped.

Without an explicit config the architecture is inferred from the tensors (SPEC §2): width and
patch size from ``patch_embed``, token grid from ``pos_embed``, depth from ``blocks.*``, heads
from the rel-pos table width (head_dim), windowed vs global blocks from the table lengths,
MLP-only blocks from missing ``attn`` keys, prompt/decoder sizes from their tensors.

Our format (``save_safetensors``): the full ``Sam3D`` state dict (``image_encoder.*``,
``prompt_encoder.*``, ``mask_decoder.*``) in a safetensors file whose metadata holds
``format = "fastsam3d"``, ``format_version = "1"`` and ``config`` = the JSON of
:class:`fastsam3d.registry.ModelConfig` (plus any caller metadata). Floating tensors are
float32, float16 or bfloat16 (converted to float32 at load). With ``dtype="int8"`` every
``nn.Linear`` weight W (out, in) is stored as int8 ``Q`` under its own key plus a float32
per-output-channel scale ``s`` (out,) under ``<key>.qscale``; loading restores
``W = Q * s[:, None]`` (symmetric, ``s = max|W_row| / 127``). Other tensors stay float16.
"""

from __future__ import annotations

import argparse
import json
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastsam3d.atomic import atomic_path
from fastsam3d.errors import CheckpointError, OutputExistsError
from fastsam3d.modeling import Sam3D
from fastsam3d.registry import ModelConfig, build_from_config, get_config

FORMAT = "fastsam3d"
FORMAT_VERSION = "1"
QSCALE = ".qscale"
PARTS = ("image_encoder.", "prompt_encoder.", "mask_decoder.")
_ENCODER_ROOTS = ("patch_embed.", "pos_embed", "blocks.", "neck.")


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read the raw tensors and metadata of a checkpoint, safely.

    Returns:
        (state dict with any ``module.`` prefix removed, metadata). Metadata is the
        safetensors header metadata, or ``{}`` for ``.pth`` files.

    Raises:
        CheckpointError: missing/unreadable file, pickled classes other than
            ``argparse.Namespace``, or no state dict inside.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if _is_safetensors(path):
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
                sd = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc
        return _strip_module(sd), meta
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = str(exc).strip().splitlines()
        detail = next((line for line in reason if "GLOBAL" in line), reason[0] if reason else "")
        raise CheckpointError(
            f"{path}: refusing to load: it pickles Python objects other than tensors and "
            f"argparse.Namespace, which could run code ({detail.strip()}). Only safetensors and "
            "weights-only .pth files are accepted."
        ) from exc
    except Exception as exc:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({exc})") from exc
    return _strip_module(_find_state_dict(obj, path)), {}


def _is_safetensors(path: Path) -> bool:
    if path.suffix == ".safetensors":
        return True
    with path.open("rb") as f:
        head = f.read(9)
    # safetensors: 8-byte little-endian header length, then a JSON object
    return len(head) == 9 and head[8:9] == b"{" and head[:2] != b"PK"


def _find_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        for key in ("model_state_dict", "state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                return _find_state_dict(obj[key], path)
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return dict(obj)
        keys = ", ".join(map(str, list(obj)[:8]))
        raise CheckpointError(
            f"{path}: no state dict found (top-level keys: {keys}); expected tensors or a "
            "'model_state_dict' entry"
        )
    raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict")


def _strip_module(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if sd and all(k.startswith("module.") for k in sd):
        return {k[len("module.") :]: v for k, v in sd.items()}
    return sd


def is_encoder_only(sd: Mapping[str, torch.Tensor]) -> bool:
    """True for the official encoder-only student layout (no ``image_encoder.`` prefix)."""
    return any(k.startswith(_ENCODER_ROOTS) for k in sd) and not any(
        k.startswith(PARTS) for k in sd
    )


def dequantize(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Undo int8 per-channel quantisation and cast floating tensors to float32."""
    out = {}
    for key, t in sd.items():
        if key.endswith(QSCALE):
            continue
        if key + QSCALE in sd:
            t = t.float() * sd[key + QSCALE].float()[:, None]
        elif t.is_floating_point():
            t = t.float()
        out[key] = t
    return out


def _count(sd: Mapping[str, torch.Tensor], pattern: str) -> int:
    idx = {int(m.group(1)) for k in sd if (m := re.match(pattern, k))}
    return max(idx) + 1 if idx else 0


def infer_sizes(sd: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Config fields readable from a full-layout state dict (see module docstring)."""
    e = "image_encoder."
    if e + "patch_embed.proj.weight" not in sd:
        raise CheckpointError(
            "no image_encoder.patch_embed.proj.weight: not a FastSAM3D/SAM-Med3D model"
        )
    pw = sd[e + "patch_embed.proj.weight"]
    dim, patch = pw.shape[0], pw.shape[2]
    grid = sd[e + "pos_embed"].shape[1] if e + "pos_embed" in sd else 128 // patch
    depth = _count(sd, r"image_encoder\.blocks\.(\d+)\.")
    has_attn = [f"{e}blocks.{i}.attn.qkv.weight" in sd for i in range(depth)]
    mlp_only = has_attn.index(True) if True in has_attn else depth
    if not all(has_attn[mlp_only:]):
        raise CheckpointError("blocks without attention must come first (official skip_layer)")
    sizes: dict[str, Any] = {
        "embed_dim": dim,
        "patch_size": patch,
        "in_chans": pw.shape[1],
        "img_size": grid * patch,
        "depth": depth,
        "mlp_only_blocks": mlp_only,
        "mlp_ratio": sd[f"{e}blocks.0.mlp.lin1.weight"].shape[0] / dim if depth else 4.0,
        "out_chans": sd[e + "neck.0.weight"].shape[0],
    }
    tables = [sd.get(f"{e}blocks.{i}.attn.rel_pos_d") for i in range(mlp_only, depth)]
    sizes["use_rel_pos"] = depth > mlp_only and tables[0] is not None
    if sizes["use_rel_pos"]:
        sizes["num_heads"] = dim // tables[0].shape[1]
        lengths = {t.shape[0] for t in tables}
        windowed = [t.shape[0] != 2 * grid - 1 for t in tables]
        if any(windowed):
            sizes["window_size"] = (
                next(t.shape[0] for t in tables if t.shape[0] != 2 * grid - 1) + 1
            ) // 2
            sizes["global_attn_indexes"] = tuple(j for j, w in enumerate(windowed) if not w)
        elif len(lengths) > 1:
            raise CheckpointError(f"inconsistent rel-pos table lengths {sorted(lengths)}")
    p, d = "prompt_encoder.", "mask_decoder."
    if p + "no_mask_embed.weight" in sd:
        pdim = sd[p + "no_mask_embed.weight"].shape[1]
        width = sd[p + "pe_layer.positional_encoding_gaussian_matrix"].shape[1]
        sizes.update(
            prompt_embed_dim=pdim,
            num_point_embeddings=_count(sd, r"prompt_encoder\.point_embeddings\.(\d+)\."),
            mask_in_chans=sd[p + "mask_downscaling.3.weight"].shape[0],
            duplicate_sine=3 * width == pdim,
        )
    if d + "mask_tokens.weight" in sd:
        sizes.update(
            num_multimask_outputs=sd[d + "mask_tokens.weight"].shape[0] - 1,
            iou_head_depth=_count(sd, r"mask_decoder\.iou_prediction_head\.layers\.(\d+)\."),
            iou_head_hidden_dim=sd[d + "iou_prediction_head.layers.0.weight"].shape[0],
            decoder_depth=_count(sd, r"mask_decoder\.transformer\.layers\.(\d+)\."),
            decoder_mlp_dim=sd[d + "transformer.layers.0.mlp.lin1.weight"].shape[0],
        )
    return sizes


def describe(sd: Mapping[str, torch.Tensor]) -> str:
    """One line saying what a state dict looks like (for error messages)."""
    if is_encoder_only(sd):
        sd = {"image_encoder." + k: v for k, v in sd.items()}
        prefix = "encoder-only "
    else:
        prefix = ""
    try:
        s = infer_sizes(sd)
    except CheckpointError:
        roots = sorted({k.split(".")[0] for k in sd})
        return f"not a FastSAM3D/SAM-Med3D layout (top-level names: {', '.join(roots[:8])})"
    kind = "SAM-Med3D-like (windowed)" if s.get("window_size") else "FastSAM3D-like"
    heads = s.get("num_heads", "?")
    return (
        f"{prefix}{kind} model: {s['depth']} blocks ({s['mlp_only_blocks']} MLP-only), "
        f"width {s['embed_dim']}, {heads} heads, {s['img_size']}^3 input, "
        f"prompt dim {s.get('prompt_embed_dim', 'absent')}"
    )


def _guess_arch(sizes: Mapping[str, Any]) -> str:
    return "sam_med3d" if sizes.get("window_size") else "fastsam3d"


def check_state_dict(model: nn.Module, sd: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise CheckpointError listing missing, unexpected and mis-shaped keys, with a hint."""
    want = model.state_dict()
    missing = [k for k in want if k not in sd]
    unexpected = [k for k in sd if k not in want]
    shapes = [
        f"{k}: file {tuple(sd[k].shape)} vs model {tuple(want[k].shape)}"
        for k in want
        if k in sd and sd[k].shape != want[k].shape
    ]
    if not (missing or unexpected or shapes):
        return

    def _list(title: str, items: list[str]) -> str:
        more = f" ... (+{len(items) - 10} more)" if len(items) > 10 else ""
        return f"\n  {title} ({len(items)}): " + ", ".join(items[:10]) + more if items else ""

    arch = getattr(getattr(model, "config", None), "arch", type(model).__name__)
    raise CheckpointError(
        f"{source} does not match architecture {arch!r}:"
        + _list("missing keys", missing)
        + _list("unexpected keys", unexpected)
        + _list("shape mismatches", shapes)
        + f"\n  the file looks like: {describe(sd)}"
    )


def load_model(
    checkpoint: str | Path,
    arch: str | None = None,
    decoder_checkpoint: str | Path | None = None,
    device: str | torch.device = "cpu",
    **overrides: Any,
) -> Sam3D:
    """Build the model a checkpoint describes and load it (see :func:`fastsam3d.build_model`)."""
    sd, meta = read_checkpoint(checkpoint)
    sd = dequantize(sd)
    source = str(checkpoint)
    if is_encoder_only(sd):
        sd = {"image_encoder." + k: v for k, v in sd.items()}
        if decoder_checkpoint is None:
            raise CheckpointError(
                f"{checkpoint} holds only an image encoder (the official FastSAM3D student "
                "format); pass decoder_checkpoint= a SAM-Med3D / SAM-Med3D-turbo checkpoint "
                "for the prompt encoder and mask decoder, as the official validation does"
            )
    if decoder_checkpoint is not None:
        dec, _ = read_checkpoint(decoder_checkpoint)
        dec = {k: v for k, v in dequantize(dec).items() if k.startswith(PARTS[1:])}
        if not dec:
            raise CheckpointError(
                f"{decoder_checkpoint} has no prompt_encoder.*/mask_decoder.* tensors; "
                f"it looks like: {describe(read_checkpoint(decoder_checkpoint)[0])}"
            )
        sd = {k: v for k, v in sd.items() if not k.startswith(PARTS[1:])} | dec
        source = f"{checkpoint} + {decoder_checkpoint}"
    config = _config_for(sd, meta, arch, source, overrides)
    with torch.device("meta"):
        model = build_from_config(config)
    check_state_dict(model, sd, source)
    model.load_state_dict(sd, assign=True)
    return model.to(device).eval()


def average_weights(model: nn.Module, others: list[nn.Module]) -> None:
    """Set ``model``'s floating-point weights to the mean of its own and ``others``' (a model
    soup: averaged checkpoints of one run or of a fine-tune and its start often beat each one);
    all must share one architecture and config."""
    for other in others:
        if other.config != model.config:
            raise CheckpointError(
                f"cannot average different models: {other.config.to_dict()} vs "
                f"{model.config.to_dict()}"
            )
    states = [other.state_dict() for other in others]
    mean = {
        key: (value + sum(s[key] for s in states)) / (len(states) + 1)
        for key, value in model.state_dict().items()
        if value.is_floating_point()
    }
    model.load_state_dict(mean, strict=False)


def _config_for(
    sd: Mapping[str, torch.Tensor],
    meta: Mapping[str, str],
    arch: str | None,
    source: str,
    overrides: dict[str, Any],
) -> ModelConfig:
    if meta.get("format") == FORMAT and "config" in meta:
        stored = ModelConfig.from_dict(json.loads(meta["config"]))
        if arch is None or arch == stored.arch:
            return ModelConfig.from_dict({**stored.to_dict(), **overrides})
    try:
        sizes = infer_sizes(sd)
    except CheckpointError as exc:
        raise CheckpointError(f"{source}: {exc}") from exc
    return get_config(arch or _guess_arch(sizes), **{**sizes, **overrides})


def save_safetensors(
    model: Sam3D,
    path: str | Path,
    *,
    dtype: str = "fp32",
    overwrite: bool = False,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write ``model`` in our safetensors format (atomic: temp file, then rename).

    Args:
        model: a built model; its ``config`` goes into the metadata.
        path: output file.
        dtype: "fp32", "fp16" or "int8" (Linear weights int8 + per-channel scales, rest fp16).
        overwrite: replace an existing file.
        metadata: extra string metadata (e.g. training provenance).

    Raises:
        OutputExistsError: ``path`` exists and ``overwrite`` is False.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path} exists; pass overwrite=True (--overwrite) to replace it")
    if dtype not in ("fp32", "fp16", "int8"):
        raise ValueError(f"dtype must be fp32, fp16 or int8, got {dtype!r}")
    linear = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    tensors = {}
    for key, t in model.state_dict().items():
        t = t.detach().cpu()
        if dtype == "int8" and key in linear:
            scale = t.abs().amax(dim=1).clamp_min(1e-12) / 127
            tensors[key] = torch.round(t / scale[:, None]).clamp(-127, 127).to(torch.int8)
            tensors[key + QSCALE] = scale.float()
        elif t.is_floating_point() and dtype != "fp32":
            tensors[key] = t.half()
        else:
            tensors[key] = t
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    meta = {**(metadata or {}), "format": FORMAT, "format_version": FORMAT_VERSION}
    if model.config is not None:
        meta["config"] = json.dumps(model.config.to_dict())
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path
