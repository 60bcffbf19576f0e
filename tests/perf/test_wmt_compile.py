"""WMT14 Transformer base and big compiled for TPU slices ahead of time (opt-in: each train step
takes minutes to compile on a small CPU host). What is asserted is what the experiment's
docstring promises: its longest batch fits in the HBM of the slice it names."""
from __future__ import annotations

import os

import pytest

from mt_flax import compile as aot
from mt_flax.config import load_config

WMT = os.path.join(os.path.dirname(__file__), "..", "..", "experiments", "wmt14_en_de.py")


@pytest.mark.parametrize("variant, topology", [("base", "v4-8"), ("big", "v4-32")])
def test_wmt_longest_batch_fits_the_slice_the_experiment_names(variant, topology):
  [row] = aot.run(load_config(f"{WMT}:{variant}"), topology, max_shapes=1, log=lambda _: None)
  assert (row["shape"]["src_len"], row["shape"]["tgt_len"]) == (256, 256)
  for step in ("train", "eval"):
    assert row[step]["hbm"]["fits"], (step, row[step]["hbm"])
    assert row[step]["flops"] > 0 and row[step]["bytes_accessed"] > 0
  assert row["train"]["collectives"]["all-reduce"]["count"] > 0
