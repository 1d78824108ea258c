"""Models: ViT encoder, noisy MAE decoder, Masked VAE head, and the pretraining model."""

from study.models.decoder import MAEDecoder
from study.models.encoder import ViTEncoder, load_pretrained_encoder
from study.models.mae import MaskedAutoencoder, MaskIndices, PretrainOutput, build_model, mask_indices
from study.models.mvae import VariationalEncoder
from study.models.pos_embed import sincos_2d

__all__ = [
    "ViTEncoder",
    "load_pretrained_encoder",
    "MAEDecoder",
    "VariationalEncoder",
    "MaskedAutoencoder",
    "MaskIndices",
    "PretrainOutput",
    "build_model",
    "mask_indices",
    "sincos_2d",
]
