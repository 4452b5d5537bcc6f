"""``Sam3D``: the composition of image encoder, prompt encoder and mask decoder."""

from __future__ import annotations

from typing import Any

from torch import nn

from fastsam3d.modeling.image_encoder import ImageEncoderViT3D
from fastsam3d.modeling.mask_decoder import MaskDecoder3D
from fastsam3d.modeling.prompt_encoder import PromptEncoder3D


class Sam3D(nn.Module):
    """Holds the three submodules under their official names (state-dict keys
    ``image_encoder.*``, ``prompt_encoder.*``, ``mask_decoder.*``) and the frozen
    :class:`fastsam3d.registry.ModelConfig` it was built from (``config.img_size``,
    ``config.accepts_boxes``, ...). Adds no computation: callers (the predictor) run the parts.
    """

    def __init__(
        self,
        image_encoder: ImageEncoderViT3D,
        prompt_encoder: PromptEncoder3D,
        mask_decoder: MaskDecoder3D,
        config: Any = None,
    ) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.config = config
