"""mrcnn_jax: Mask R-CNN in JAX/Flax."""

__version__ = "0.1.0"
