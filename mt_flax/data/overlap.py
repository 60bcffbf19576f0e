"""Leak-free splits: sentences compared by a normalised key, pairs grouped by shared sentences.

:func:`sentence_key` is the comparison (Unicode case folding, runs of whitespace made
one space, nothing else). :func:`components` groups pairs that share an English or a
Spanish sentence, directly or through other pairs; a builder that puts each group into
one split has no held-out sentence, on either side, that also occurs in another split.
"""
from __future__ import annotations

from typing import Sequence


def sentence_key(text: str) -> str:
  """The comparison key of a sentence: case-folded, whitespace runs made one space."""
  return " ".join(text.casefold().split())


def components(pairs: Sequence[tuple[str, str]]) -> list[str]:
  """The component of every ``(english, spanish)`` pair, named by its smallest English key.

  Two pairs are in one component when they share an English or a Spanish sentence
  (up to :func:`sentence_key`), directly or through other pairs.
  """
  parent: dict[tuple[str, str], tuple[str, str]] = {}

  def root(node: tuple[str, str]) -> tuple[str, str]:
    while parent.setdefault(node, node) != node:
      parent[node] = parent[parent[node]]
      node = parent[node]
    return node

  for en, es in pairs:
    a, b = root(("en", sentence_key(en))), root(("es", sentence_key(es)))
    if a != b:
      parent[max(a, b)] = min(a, b)
  name: dict[tuple[str, str], str] = {}
  for en, _ in pairs:
    key = sentence_key(en)
    top = root(("en", key))
    name[top] = min(name.get(top, key), key)
  return [name[root(("en", sentence_key(en)))] for en, _ in pairs]
