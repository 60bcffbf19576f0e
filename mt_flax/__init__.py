"""mt_flax: Transformer machine translation in JAX/Flax with attention masks correct by construction."""
from mt_flax.allocator import tune_malloc as _tune_malloc

__version__ = "0.1.0"
_tune_malloc()   # before XLA allocates: see mt_flax.allocator (MT_FLAX_MALLOC=0 skips it)
