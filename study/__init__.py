"""cimle-mae: least-squares vs conditional IMLE masked-autoencoder pretraining."""

__version__ = "0.1.0"
