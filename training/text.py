"""Captions built from the taxonomy, as in BioCLIP (Stevens et al., CVPR 2024).

Pure functions: a lineage (a mapping with the seven rank columns plus an optional
``common_name``) goes in, a caption string comes out.

========================  ==================================================================
text type                 caption for *Acer circinatum* ("Vine Maple")
========================  ==================================================================
``taxonomic``             ``a photo of Plantae Tracheophyta Magnoliopsida Sapindales
                          Sapindaceae Acer circinatum.``
``scientific``            ``a photo of Acer circinatum.``
``common``                ``a photo of Vine Maple.``
``scientific_common``     ``a photo of Acer circinatum with common name Vine Maple.``
``taxonomic_common``      ``a photo of Plantae ... Acer circinatum with common name Vine Maple.``
``mixed``                 one of the five above, drawn once per batch (:func:`text_type_for_step`)
========================  ==================================================================

Rules (all documented here so the strings are predictable):

* Ranks kingdom..genus are capitalised (first letter upper, the rest lower); the epithet is
  lower case. Empty ranks (``''``/NaN/None) are dropped, nothing is invented for them.
* ``species`` holds the binomial (``"Acer circinatum"``). The epithet is the binomial
  without its first word (so trinomials keep their subspecies: ``"pica pica"``). A
  one-word ``species`` value that differs from the genus is taken as the epithet itself.
  When the genus column is empty, the genus is read from the binomial's first word.
* ``scientific`` is ``Genus epithet``; without an epithet it is the genus alone; without a
  genus it is the lowest rank that is known (e.g. the family).
* A missing common name falls back to ``scientific`` (``common``), and the ``..._common``
  types then omit the ``with common name`` clause.
* A lineage with no rank at all gives ``''`` (the caller should drop such rows).
"""

from __future__ import annotations

import math
import random
from typing import Mapping

from treeprobe._utils import RANKS
from treeprobe.errors import TreeprobeError

#: The fixed text types, in the order ``mixed`` draws from.
TEXT_TYPES = ("taxonomic", "scientific", "common", "scientific_common", "taxonomic_common")
#: Every ``--text-type`` value: the fixed types and ``mixed`` (one drawn per batch).
TEXT_TYPE_CHOICES = TEXT_TYPES + ("mixed",)
#: The caption around the name part.
TEMPLATE = "a photo of {}."
#: The clause that adds a common name to the ``..._common`` types.
COMMON_CLAUSE = "{} with common name {}"
_ABOVE_GENUS = RANKS[:5]  # kingdom .. family

__all__ = [
    "RANKS",
    "TEXT_TYPES",
    "TEXT_TYPE_CHOICES",
    "TEMPLATE",
    "COMMON_CLAUSE",
    "clean",
    "split_binomial",
    "taxonomic_name",
    "scientific_name",
    "common_name",
    "caption_body",
    "make_caption",
    "all_captions",
    "text_type_for_step",
]


def clean(value) -> str:
    """A cell as a stripped string; ``None``/NaN/``'nan'``-free: missing → ``''``."""
    if value is None:
        return ""
    if isinstance(value, float) and math.isnan(value):
        return ""
    s = " ".join(str(value).split())
    return "" if s.lower() in ("nan", "none") else s


def _cap(s: str) -> str:
    """First letter upper case, the rest lower."""
    return s[:1].upper() + s[1:].lower() if s else s


def split_binomial(genus: str, species: str) -> tuple[str, str]:
    """(Genus, epithet) from the genus column and the binomial ``species`` column.

    >>> split_binomial("Acer", "Acer circinatum")
    ('Acer', 'circinatum')
    >>> split_binomial("", "Acer circinatum")
    ('Acer', 'circinatum')
    >>> split_binomial("Acer", "")
    ('Acer', '')
    """
    genus, species = clean(genus), clean(species)
    words = species.split()
    if not words:
        return _cap(genus), ""
    if len(words) == 1:
        if genus and words[0].lower() == genus.lower():
            return _cap(genus), ""
        if not genus:  # a lone capitalised word is a genus-level name, else an epithet
            return (_cap(words[0]), "") if words[0][:1].isupper() else ("", words[0].lower())
        return _cap(genus), words[0].lower()
    return _cap(genus or words[0]), " ".join(words[1:]).lower()


def taxonomic_name(lineage: Mapping) -> str:
    """``Kingdom Phylum Class Order Family Genus epithet``, empty ranks dropped."""
    parts = [_cap(clean(lineage.get(r, ""))) for r in _ABOVE_GENUS]
    genus, epithet = split_binomial(lineage.get("genus", ""), lineage.get("species", ""))
    parts += [genus, epithet]
    return " ".join(p for p in parts if p)


def scientific_name(lineage: Mapping) -> str:
    """``Genus epithet``; genus alone without epithet; else the lowest known rank."""
    genus, epithet = split_binomial(lineage.get("genus", ""), lineage.get("species", ""))
    if genus:
        return f"{genus} {epithet}".strip()
    for r in reversed(_ABOVE_GENUS):
        v = clean(lineage.get(r, ""))
        if v:
            return f"{_cap(v)} {epithet}".strip()
    return epithet


def common_name(lineage: Mapping) -> str:
    """The ``common_name`` field, or ``''`` when absent."""
    return clean(lineage.get("common_name", ""))


def caption_body(lineage: Mapping, text_type: str) -> str:
    """The name part of the caption (without ``a photo of``) for one fixed text type."""
    if text_type == "taxonomic":
        return taxonomic_name(lineage)
    if text_type == "scientific":
        return scientific_name(lineage)
    com = common_name(lineage)
    if text_type == "common":
        return com or scientific_name(lineage)
    if text_type == "scientific_common":
        base = scientific_name(lineage)
    elif text_type == "taxonomic_common":
        base = taxonomic_name(lineage)
    else:
        raise TreeprobeError(f"unknown text type {text_type!r}; expected one of {TEXT_TYPES}")
    if not com or not base:
        return base or com
    return COMMON_CLAUSE.format(base, com)


def make_caption(lineage: Mapping, text_type: str) -> str:
    """``a photo of {body}.`` for a fixed text type; ``''`` if the lineage is empty.

    >>> magpie = {"kingdom": "Animalia", "phylum": "Chordata", "class": "Aves", "order": "Passeriformes",
    ...           "family": "Corvidae", "genus": "Pica", "species": "Pica pica", "common_name": "Eurasian magpie"}
    >>> make_caption(magpie, "taxonomic")
    'a photo of Animalia Chordata Aves Passeriformes Corvidae Pica pica.'
    >>> make_caption(magpie, "scientific_common")
    'a photo of Pica pica with common name Eurasian magpie.'
    >>> make_caption({"genus": "Pica", "species": "Pica pica"}, "common")  # no common name: scientific
    'a photo of Pica pica.'
    >>> make_caption({}, "taxonomic")
    ''
    """
    body = caption_body(lineage, text_type)
    return TEMPLATE.format(body) if body else ""


def all_captions(lineage: Mapping) -> dict[str, str]:
    """Every fixed text type → caption, e.g. for the ``json`` of a webdataset sample."""
    return {t: make_caption(lineage, t) for t in TEXT_TYPES}


def text_type_for_step(text_type: str, step: int, seed: int = 0) -> str:
    """The text type used for the batch at global ``step``.

    Fixed types are returned unchanged. ``mixed`` draws one of :data:`TEXT_TYPES`
    uniformly with a generator seeded by ``(seed, step)`` only, so every rank of a
    distributed run and every rerun/resume picks the same type for the same step.

    >>> text_type_for_step("scientific", 7)
    'scientific'
    >>> [text_type_for_step("mixed", step, seed=0) for step in range(4)]
    ['common', 'taxonomic_common', 'common', 'taxonomic']
    """
    if text_type != "mixed":
        if text_type not in TEXT_TYPES:
            raise TreeprobeError(f"unknown text type {text_type!r}; expected one of {TEXT_TYPE_CHOICES}")
        return text_type
    rng = random.Random(f"treeprobe-mixed:{int(seed)}:{int(step)}")
    return rng.choice(TEXT_TYPES)
