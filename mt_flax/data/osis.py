"""OSIS verse markup to plain text: notes dropped, no two words glued together.

SWORD modules store each verse as an OSIS fragment. Words sit in inline
elements (`<w>`, `<q>`, `<transChange>`); footnotes and cross references in
`<note>`; poetry lines, paragraphs and chapter marks are elements or milestones
(`<l sID=…/>`, `<div type="x-p" eID=…/>`). A verse may also carry text that is
not scripture: speaker labels, non-canonical headings, and whole glossaries or
introductions between `<div type="glossary" sID=X/>` and `<div … eID=X/>`.

Rules:
- dropped with their content: `note` (and whatever it contains), `speaker`,
  non-canonical `title`, milestone regions of non-scripture `div` types;
  canonical titles (psalm superscriptions) are kept, as the Spanish text has them;
- block elements (`l`, `lg`, `lb`, `p`, `div`, `item`, `title`, `chapter`, …)
  separate words: they become a space;
- a dropped element and the edges of `transChange` (words added by translators,
  written without spaces around them in the Reina-Valera module) become a space
  unless punctuation already separates the words ("God,”" stays "God,”");
  a `transChange` holding only an enclitic pronoun right after its verb
  ("díjo<transChange>le</transChange>") is joined to the verb ("díjole");
- entities are decoded, runs of spaces collapsed, spaces before ,.;:!?) removed.
"""
from __future__ import annotations

import html
import re

_TAG_OR_TEXT = re.compile(r"<[^>]*>|[^<]+")
_NAME = re.compile(r"</?\s*([A-Za-z][\w:.-]*)")
_ATTR = re.compile(r"""([\w:.-]+)\s*=\s*(?:"([^"]*)"|'([^']*)')""")

DROPPED = frozenset({"note", "speaker", "catchWord", "rdg", "figure", "index"})
BLOCK = frozenset({"l", "lg", "lb", "p", "div", "item", "list", "title", "chapter", "verse",
                   "milestone", "br", "head", "table", "row", "cell", "speech"})
NON_SCRIPTURE_DIVS = frozenset({"glossary", "introduction", "preface", "titlePage", "front",
                                "back", "colophon", "appendix", "index", "concordance",
                                "x-notes"})
_INLINE_TAG = re.compile(r"</?(?:w|q|seg|hi|name|foreign|divineName|reference)\b[^>]*>")
CLOSERS = frozenset(",.;:!?)]}”’»…")
OPENERS = frozenset("([{“‘«¿¡")

_SOFT = "\x00"          # a removed element: a space unless punctuation separates already
_ADDED_START = "\x02"   # <transChange>
_ADDED_END = "\x03"     # </transChange>
_ENCLITIC = re.compile(
    r"(?P<host>[^\W\d_]+)" + _ADDED_START
    + r"(?P<clitic>(?:me|te|se|le|les|lo|los|la|las|nos|os)+)" + _ADDED_END
    + r"(?![^\W\d_])", re.IGNORECASE)


def _is_verb_host(word: str) -> bool:
  """A word that takes enclitic pronouns: infinitive, gerund, imperative, or an
  accented finite form in lower case (capitalised accented words are mostly names)."""
  lowered = word.lower()
  if re.search(r"(?:[aeií]r|ndo|[aei]d|me|te)$", lowered):
    return True
  return word[:1].islower() and bool(re.search(r"[áéíóú]", word))


def _join_enclitic(match: re.Match) -> str:
  if _is_verb_host(match.group("host")):
    return match.group("host") + match.group("clitic")
  return match.group(0)


def _soft_space(match: re.Match) -> str:
  text, start, end = match.string, match.start(), match.end()
  before = text[start - 1] if start > 0 else " "
  after = text[end] if end < len(text) else " "
  if before.isspace() or after.isspace() or before in OPENERS or after in CLOSERS:
    return ""
  return " "


def _attributes(tag: str) -> dict[str, str]:
  return {key: a if a else b for key, a, b in _ATTR.findall(tag)}


def to_text(osis: str) -> str:
  """Plain text of one OSIS verse fragment (see the module docstring for the rules)."""
  pieces: list[str] = []
  depth = 0                  # > 0 inside a dropped element
  regions: set[str] = set()  # sIDs of open non-scripture milestone regions
  for token in _TAG_OR_TEXT.findall(_INLINE_TAG.sub("", osis)):
    if token[0] != "<":
      if depth == 0 and not regions:
        pieces.append(html.unescape(token) if "&" in token else token)
      continue
    name_match = _NAME.match(token)
    if name_match is None:   # a comment or processing instruction
      continue
    name = name_match.group(1)
    is_end, is_empty = token.startswith("</"), token.endswith("/>")
    if regions:
      if name == "div" and _attributes(token).get("eID") in regions:
        regions.discard(_attributes(token)["eID"])
        pieces.append(_SOFT)
      continue
    if depth:
      if not is_empty:
        depth += -1 if is_end else 1
      if depth == 0:
        pieces.append(_SOFT)
      continue
    if name == "div" and not is_end:
      attrs = _attributes(token)
      if "sID" in attrs and attrs.get("type") in NON_SCRIPTURE_DIVS:
        regions.add(attrs["sID"])
        continue
    if name in DROPPED or (name == "title" and not is_end
                           and _attributes(token).get("canonical") != "true"):
      if is_empty or is_end:
        pieces.append(_SOFT)
      else:
        depth = 1
      continue
    if name == "title" and is_end:
      pieces.append(" ")
    elif name == "transChange":
      pieces.append(_ADDED_END if is_end else _ADDED_START)
    elif name in BLOCK:
      pieces.append(" ")
  text = _ENCLITIC.sub(_join_enclitic, "".join(pieces))
  text = text.replace(_ADDED_START, _SOFT).replace(_ADDED_END, _SOFT)
  text = re.sub(_SOFT + "+", _soft_space, text)
  text = " ".join(text.split())
  return re.sub(r"(?<=\S) +(?=[,.;:!?)])", "", text)
