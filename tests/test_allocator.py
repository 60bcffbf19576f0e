"""mt_flax.allocator: importing mt_flax keeps freed large blocks in the process (no page faults
when they are allocated again); MT_FLAX_MALLOC=0 leaves glibc's defaults, which hand them back."""
import json
import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
    reason="the malloc settings are glibc's (mallopt); this platform has no glibc")

ROUNDS = 10
PROBE = f"""
import json, resource
import numpy as np
import mt_flax
from mt_flax import allocator

def faults():
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

block = np.ones(64 << 20, np.uint8)   # above glibc's largest dynamic mmap threshold (32 MiB)
del block
before = faults()
for _ in range({ROUNDS}):
  block = np.ones(64 << 20, np.uint8)
  del block
print(json.dumps({{"applied": allocator.tune_malloc(), "faults": faults() - before}}))
"""


def _probe(**env):
  out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                       env={**os.environ, **env}, timeout=120, check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_keeps_large_blocks_and_the_switch_turns_it_off():
  tuned = _probe(MT_FLAX_MALLOC="1")
  default = _probe(MT_FLAX_MALLOC="0")
  assert tuned["applied"] is True and default["applied"] is False
  # glibc's defaults unmap each freed 64 MiB block and fault it in again (16k pages a round
  # without huge pages); the tuned process reuses the block it already has.
  assert default["faults"] >= 10 * ROUNDS, default
  assert tuned["faults"] * 20 <= default["faults"], (tuned, default)
