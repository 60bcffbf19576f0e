"""Data: TFDS builders (array_record), SentencePiece tokenizer, Grain pipeline.

    tokenizer = load_or_train_tokenizer(config, workdir)
    batches = train_iterator(config, tokenizer, rows=partitioner.rows, batch_multiple=...)
    feed = Prefetcher(batches, place=partitioner.shard_batch, depth=config.data.prefetch)
    examples = eval_examples(config, tokenizer, "validation")
    for batch, indices in eval_batches(examples, config.batch_tokens): ...
"""
from mt_flax.data.pipeline import (eval_batches, eval_examples, train_iterator, train_shapes,
                                   training_set)
from mt_flax.data.prefetch import Prefetcher
from mt_flax.data.sources import DataError, load_pairs
from mt_flax.data.tokenizer import Tokenizer, load_or_train_tokenizer

__all__ = [
    "DataError", "Prefetcher", "Tokenizer", "eval_batches", "eval_examples",
    "load_or_train_tokenizer", "load_pairs", "train_iterator", "train_shapes", "training_set",
]
