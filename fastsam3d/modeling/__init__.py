"""Pure-PyTorch FastSAM3D / SAM-Med3D modules (imports nothing but torch)."""

from fastsam3d.modeling.attention import (
    Attention,
    attend,
    available_backends,
    set_attention_backend,
)
from fastsam3d.modeling.image_encoder import ImageEncoderViT3D
from fastsam3d.modeling.mask_decoder import MaskDecoder3D
from fastsam3d.modeling.prompt_encoder import PromptEncoder3D
from fastsam3d.modeling.sam3d import Sam3D
from fastsam3d.modeling.transformer import TwoWayTransformer3D

__all__ = [
    "Attention",
    "ImageEncoderViT3D",
    "MaskDecoder3D",
    "PromptEncoder3D",
    "Sam3D",
    "TwoWayTransformer3D",
    "attend",
    "available_backends",
    "set_attention_backend",
]
