"""big_contrast: contrastive pretraining in JAX/Flax, from a 2-core CPU to a TPU pod."""

__version__ = "0.1.0"
