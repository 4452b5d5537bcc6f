"""Predictor: one model on one device, a cache of crop embeddings, prompts in, logits out.

Like segment-anything's ``SamPredictor``, the expensive image embedding is computed once per
crop and every refinement click reruns only the prompt encoder and the mask decoder. Unlike it,
several crops stay cached (LRU), because an interactive session moves between crops and
objects. Torch only: no file I/O beyond the checkpoint, no geometry.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from pathlib import Path

import torch

from fastsam3d.errors import PromptError


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> CUDA if available, else CPU; anything else as torch understands it."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class Predictor:
    """Runs a :class:`~fastsam3d.modeling.sam3d.Sam3D` on crops with an embedding cache.

    Args:
        model: the model (moved to ``device`` and set to eval mode).
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ...
        cache_size: how many crop embeddings to keep.
    """

    def __init__(self, model: torch.nn.Module, device: str | torch.device = "auto", cache_size: int = 16):
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        self.cache_size = cache_size
        self._cache: OrderedDict[Hashable, torch.Tensor] = OrderedDict()
        self._embedding: torch.Tensor | None = None
        self.encoder_calls = 0  # how many times the image encoder ran (tests check the cache)

    @property
    def accepts_boxes(self) -> bool:
        return bool(getattr(self.model.config, "accepts_boxes", False))

    @property
    def img_size(self) -> int:
        return int(getattr(self.model.config, "img_size", 128))

    @torch.inference_mode()
    def set_image(self, image: torch.Tensor | None = None, key: Hashable | None = None) -> None:
        """Select the crop to prompt on, computing its embedding unless ``key`` is cached.

        Args:
            image: (1, 1, S, S, S) normalised crop; may be None if ``key`` is cached.
            key: cache key (e.g. the crop grid); None disables caching for this image.
        """
        if key is not None and key in self._cache:
            self._cache.move_to_end(key)
            self._embedding = self._cache[key]
            return
        if image is None:
            raise KeyError(f"no cached embedding for {key!r} and no image given")
        embedding = self.model.image_encoder(image.to(self.device, torch.float32))
        self.encoder_calls += 1
        self._embedding = embedding
        if key is not None:
            self._cache[key] = embedding
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)

    def is_cached(self, key: Hashable) -> bool:
        return key in self._cache

    def clear_cache(self) -> None:
        self._cache.clear()
        self._embedding = None

    @torch.inference_mode()
    def predict(
        self,
        points: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        box: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
        multimask: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode masks for the current crop.

        Args:
            points: (N, 3) or (1, N, 3) crop voxel coordinates (tensor axes 2, 3, 4).
            labels: (N,) or (1, N): 1 positive, 0 negative.
            box: (2, 3) or (1, 2, 3) lo/hi corners in crop voxel units (models with boxes only).
            mask_input: (1, 1, 32, 32, 32) previous low-res logits (official first click: zeros).
            multimask: return the 3 multimask outputs instead of the single one.

        Returns:
            ``(low_res_logits, iou)``: (1, K, 32, 32, 32) and (1, K), K = 3 if multimask else 1.
        """
        if self._embedding is None:
            raise RuntimeError("call set_image() before predict()")
        if box is not None and not self.accepts_boxes:
            raise PromptError("this model was not trained with box prompts; use clicks instead")
        dev = self.device
        pts = None
        if points is not None:
            coords = torch.as_tensor(points, dtype=torch.float32, device=dev).reshape(1, -1, 3)
            lbl = torch.as_tensor(labels, dtype=torch.int64, device=dev).reshape(1, -1)
            pts = (coords, lbl)
        boxes = None if box is None else torch.as_tensor(box, dtype=torch.float32, device=dev).reshape(1, 2, 3)
        masks = None if mask_input is None else mask_input.to(dev, torch.float32)
        sparse, dense = self.model.prompt_encoder(points=pts, boxes=boxes, masks=masks)
        low_res, iou = self.model.mask_decoder(
            image_embeddings=self._embedding,
            image_pe=self.model.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask,
        )
        return low_res, iou


def load_predictor(model: str | Path | torch.nn.Module = "default", device: str = "auto") -> tuple[Predictor, str]:
    """A predictor for ``model``: ``"default"`` (bundled weights), a checkpoint path, or a module.

    Returns the predictor and a display name. Raises CheckpointError if ``"default"`` is asked
    for and no trained weights are bundled: random weights are never presented as a model.
    """
    from fastsam3d.errors import CheckpointError
    from fastsam3d.registry import build_model

    if isinstance(model, torch.nn.Module):
        return Predictor(model, device), type(model).__name__
    if str(model) == "default":
        from fastsam3d.weights import default_checkpoint

        path = default_checkpoint()
        if path is None:
            raise CheckpointError(
                "no trained default weights are bundled with this installation; pass a "
                "checkpoint file (e.g. an official FastSAM3D or SAM-Med3D .pth) with --model PATH"
            )
        return Predictor(build_model(checkpoint=path), device), "default"
    path = Path(model)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint file (use 'default' or a path)")
    return Predictor(build_model(checkpoint=path), device), path.name
