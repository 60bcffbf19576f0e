"""Fixtures of the performance probes: a synthetic corpus.

  ``synthetic_corpus`` factory writing a spa-eng.zip of a toy English->Spanish lexicon
"""
import random
import zipfile
from pathlib import Path

import pytest

# A toy lexicon: English word i translates to Spanish word i, so a few dozen updates
# of a tiny model already produce recognisable output.
LEXICON = dict(zip(
    ("the cat dog house red blue small big runs eats sees quickly slowly tree river mountain "
     "friend teacher book table window green yellow happy sad old new").split(),
    ("el gato perro casa rojo azul pequeño grande corre come ve rápido lento árbol río montaña "
     "amigo maestro libro mesa ventana verde amarillo feliz triste viejo nuevo").split()))


def write_synthetic_corpus(folder: Path, n: int = 600, seed: int = 0, max_words: int = 30) -> Path:
  """``folder/spa-eng.zip`` with ``n`` pairs of 1..max_words words (skewed to short ones)."""
  rng = random.Random(seed)
  english = list(LEXICON)
  lines = []
  for i in range(n):
    k = min(max_words, max(1, int(rng.lognormvariate(1.6, 0.6))))
    words = [rng.choice(english) for _ in range(k)]
    lines.append(" ".join(words).capitalize() + f" {i}.\t"
                 + " ".join(LEXICON[w] for w in words).capitalize() + f" {i}.\n")
  folder.mkdir(parents=True, exist_ok=True)
  with zipfile.ZipFile(folder / "spa-eng.zip", "w") as archive:
    archive.writestr("spa-eng/spa.txt", "".join(lines))
  return folder


@pytest.fixture(scope="session")
def synthetic_corpus():
  return write_synthetic_corpus
