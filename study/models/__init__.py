"""Networks: the ViT encoder, the MAE decoder with its noise modules, the Masked VAE's variational encoder.

The pretraining model (encoder, decoder prefix, objective) is :mod:`study.methods.model`."""

from study.models.decoder import MAEDecoder
from study.models.encoder import ViTEncoder, load_pretrained_encoder
from study.models.mvae import VariationalEncoder
from study.models.pos_embed import sincos_2d

__all__ = [
    "ViTEncoder",
    "load_pretrained_encoder",
    "MAEDecoder",
    "VariationalEncoder",
    "sincos_2d",
]
