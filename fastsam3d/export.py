"""ONNX export (``fastsam3d export-onnx``) and an onnxruntime predictor that needs no torch.

Two graphs (three for some models), as the interactive loop uses them:

* ``encoder.onnx``: ``image`` (1, 1, S, S, S) normalised crop -> ``embedding`` (1, C, S/16, ...).
* ``decoder.onnx``: prompt encoder + mask decoder: ``embedding``, ``point_coords`` (1, N, 3)
  crop voxels, ``point_labels`` (1, N) int64 (N is dynamic; the labels of
  :meth:`~fastsam3d.modeling.prompt_encoder.PromptEncoder3D.embed_points`: 1 positive,
  0 negative, -1 the padding point that follows clicks without a box, 2 / 3 a box's corners),
  ``mask_input`` (1, 1, S/4, S/4, S/4) previous low-res logits (zeros on a first click) ->
  ``low_res_logits`` (1, 1, S/4, ...) and ``iou`` (1, 1). :class:`OnnxPredictor` adds the
  padding point or the box corners, so boxes work wherever the model has box embeddings.
* ``decoder_first.onnx``, only for models with ``first_click_multimask``: the same with all 4
  outputs (1, 4, ...), (1, 4), from which a lone first click takes the one of highest IoU (a
  second graph, so that refinements keep decoding the single output only).

:class:`OnnxPredictor` has the :class:`~fastsam3d.predictor.Predictor` methods on numpy arrays
with onnxruntime's CPU backend, so the Slicer module and light clients can run without torch,
and a :class:`~fastsam3d.session.Session` runs on it when given the exported folder as its model.
This module imports torch only inside :func:`export_onnx`.
"""

from __future__ import annotations

import copy
import json
import warnings
from collections.abc import Hashable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fastsam3d.cache import EmbeddingCache
from fastsam3d.errors import FastSAM3DError, PromptError
from fastsam3d.transforms import MODEL_SPACING_MM

if TYPE_CHECKING:
    import torch

ENCODER_FILE = "encoder.onnx"
DECODER_FILE = "decoder.onnx"
FIRST_CLICK_FILE = "decoder_first.onnx"
META_FILE = "onnx_meta.json"
OPSET = 17
FORMAT = 2  # 2: padding and box corners are decoder inputs (1: padding inside, clicks only)


def _click_module(model: torch.nn.Module, outputs: range | None = None) -> torch.nn.Module:
    """The prompt encoder + mask decoder on labelled points (clicks, padding, box corners) as
    one module (dense PE a constant); ``outputs`` as in the mask decoder (None: the single)."""
    import torch

    class Click(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.prompt_encoder = model.prompt_encoder
            self.mask_decoder = model.mask_decoder
            self.register_buffer("dense_pe", model.prompt_encoder.get_dense_pe().detach())

        def forward(self, embedding, point_coords, point_labels, mask_input):
            sparse = self.prompt_encoder.embed_points(point_coords, point_labels)
            dense = self.prompt_encoder.mask_downscaling(mask_input)
            return self.mask_decoder(embedding, self.dense_pe, sparse, dense, False, outputs)

    return Click().eval()


def export_onnx(
    model: torch.nn.Module, out_dir: str | Path, opset: int = OPSET
) -> tuple[Path, Path]:
    """Write ``encoder.onnx``, ``decoder.onnx`` and ``onnx_meta.json`` for ``model``.

    Uses the TorchScript-based exporter (``dynamo=False``): it needs no onnxscript and handles
    the model's reshapes; graphs are float32 with fixed crop size and a dynamic click count.
    Returns the two model paths.
    """
    import torch

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = model.float().cpu().eval()
    size = int(getattr(model.config, "img_size", 128))
    image = torch.randn(1, 1, size, size, size)
    low = size // 4
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python-side shape checks
        embedding = model.image_encoder(image)
        enc_path, dec_path = out / ENCODER_FILE, out / DECODER_FILE
        torch.onnx.export(
            model.image_encoder,
            (image,),
            str(enc_path),
            input_names=["image"],
            output_names=["embedding"],
            opset_version=opset,
            dynamo=False,
        )
        inputs = (
            embedding,
            torch.tensor(
                [[[size / 2, size / 2, size / 2], [size / 3, size / 2, size / 2], [0, 0, 0]]]
            ),
            torch.tensor([[1, 0, -1]]),
            torch.zeros(1, 1, low, low, low),
        )
        graphs = [(dec_path, None)]
        if model.config.first_click_multimask:
            graphs.append((out / FIRST_CLICK_FILE, range(model.mask_decoder.num_mask_tokens)))
        for path, outputs in graphs:
            torch.onnx.export(
                _click_module(model, outputs),
                inputs,
                str(path),
                input_names=["embedding", "point_coords", "point_labels", "mask_input"],
                output_names=["low_res_logits", "iou"],
                dynamic_axes={"point_coords": {1: "n_points"}, "point_labels": {1: "n_points"}},
                opset_version=opset,
                dynamo=False,
            )
    meta = {
        "format": FORMAT,
        "img_size": size,
        "low_res": low,
        "opset": opset,
        "accepts_boxes": model.config.accepts_boxes,
        "config": model.config.to_dict(),
    }
    (out / META_FILE).write_text(json.dumps(meta, indent=1))
    return enc_path, dec_path


class OnnxPredictor:
    """Predictor on onnxruntime (CPU), with the :class:`~fastsam3d.predictor.Predictor`
    interface a :class:`~fastsam3d.session.Session` uses: ``set_image`` (with an embedding
    cache keyed by crop), then ``predict``. Inputs may be numpy arrays or CPU torch tensors;
    outputs are numpy arrays. Clicks and boxes; the 3 multimask outputs alone are not exported,
    all 4 are for models with ``first_click_multimask``.

    Args:
        folder: where :func:`export_onnx` wrote its files.
        threads: intra-op threads (None: onnxruntime's default, one per core).
        cache_size: how many crop embeddings to keep.
    """

    device = "cpu"

    def __init__(self, folder: str | Path, threads: int | None = None, cache_size: int = 16):
        try:
            import onnxruntime as ort
        except ImportError:
            raise FastSAM3DError(
                "onnxruntime is not installed: pip install 'fastsam3d[onnx]'"
            ) from None
        folder = Path(folder)
        missing = [f for f in (ENCODER_FILE, DECODER_FILE, META_FILE) if not (folder / f).is_file()]
        if missing:
            raise FastSAM3DError(
                f"{folder}: missing {', '.join(missing)}; run fastsam3d export-onnx"
            )
        self.meta = json.loads((folder / META_FILE).read_text())
        if self.meta.get("format") != FORMAT:
            raise FastSAM3DError(
                f"{folder} was exported by an older fastsam3d (format "
                f"{self.meta.get('format', 1)}, this one reads {FORMAT}); "
                "run fastsam3d export-onnx again"
            )
        self.accepts_boxes = bool(self.meta["accepts_boxes"])
        config = self.meta.get("config", {})
        self.first_click_multimask = bool(config.get("first_click_multimask", False))
        self.crop_spacing_mm = float(config.get("crop_spacing_mm", MODEL_SPACING_MM))
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        providers = ["CPUExecutionProvider"]
        self._encoder = ort.InferenceSession(str(folder / ENCODER_FILE), opts, providers=providers)
        self._decoder = ort.InferenceSession(str(folder / DECODER_FILE), opts, providers=providers)
        self._first_click = None
        if self.first_click_multimask:
            if not (folder / FIRST_CLICK_FILE).is_file():
                raise FastSAM3DError(
                    f"{folder}: missing {FIRST_CLICK_FILE}; run fastsam3d export-onnx"
                )
            self._first_click = ort.InferenceSession(
                str(folder / FIRST_CLICK_FILE), opts, providers=providers
            )
        self._embedding: np.ndarray | None = None
        self._cache = EmbeddingCache(cache_size)
        self.encoder_calls = 0

    def set_image(self, image=None, key: Hashable | None = None) -> None:
        """Select the crop to prompt on, encoding it unless ``key`` is cached.

        Args:
            image: (1, 1, S, S, S) normalised crop (float32); may be None if ``key`` is cached.
            key: cache key (e.g. the crop grid); None disables caching for this image.
        """
        self._embedding = self._cache.fetch(key, image, self._encode_crop)

    def _encode_crop(self, image) -> np.ndarray:
        self.encoder_calls += 1
        (embedding,) = self._encoder.run(None, {"image": np.ascontiguousarray(image, np.float32)})
        return embedding

    def share(self) -> OnnxPredictor:
        """A predictor on the same onnxruntime sessions (thread-safe) with its own embedding
        cache (one per user session in the server)."""
        twin = copy.copy(self)
        twin._cache = EmbeddingCache(self._cache.size)
        twin._embedding = None
        twin.encoder_calls = 0
        return twin

    def is_cached(self, key: Hashable) -> bool:
        return key in self._cache

    def clear_cache(self) -> None:
        self._cache.clear()
        self._embedding = None

    def predict(
        self, points=None, labels=None, box=None, mask_input=None, multimask: bool | str = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """Clicks (N, 3) crop voxels and labels (N,) (1 positive, 0 negative) and/or a box (2, 3)
        low/high corners, optional previous low-res logits (1, 1, L, L, L) -> low-res logits
        (1, 1, L, L, L), iou (1, 1); with ``multimask="all"`` (models with
        ``first_click_multimask``) all 4 outputs, (1, 4, L, L, L) and (1, 4)."""
        if self._embedding is None:
            raise RuntimeError("call set_image() before predict()")
        if box is not None and not self.accepts_boxes:
            raise PromptError("this model was not trained with box prompts; use clicks instead")
        if points is None and box is None:
            raise PromptError("give at least one click or a box")
        decoder = self._first_click if multimask == "all" else self._decoder
        if multimask is True or decoder is None:
            raise ValueError(
                "this export has the single output only (and all 4 for models "
                "with first_click_multimask)"
            )
        coords: list[np.ndarray] = []
        codes: list[np.ndarray] = []
        if points is not None:
            coords.append(np.asarray(points, np.float32).reshape(-1, 3))
            codes.append(np.asarray(labels, np.int64).reshape(-1))
        if box is None:  # the padding point that follows clicks without a box
            coords.append(np.zeros((1, 3), np.float32))
            codes.append(np.array([-1]))
        else:
            coords.append(np.asarray(box, np.float32).reshape(2, 3))
            codes.append(np.array([2, 3]))
        low = self.meta["low_res"]
        if mask_input is None:
            mask_input = np.zeros((1, 1, low, low, low), np.float32)
        logits, iou = decoder.run(
            None,
            {
                "embedding": self._embedding,
                "point_coords": np.concatenate(coords)[None],
                "point_labels": np.concatenate(codes)[None],
                "mask_input": np.ascontiguousarray(mask_input, dtype=np.float32),
            },
        )
        return logits, iou
