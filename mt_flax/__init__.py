"""mt_flax: Transformer machine translation in JAX/Flax with attention masks correct by construction."""

__version__ = "0.1.0"
