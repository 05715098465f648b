"""qformer: train, evaluate and export BLIP-2 Q-Formers."""

__version__ = "0.1.0"
