"""Text embeddings of taxa: BioCLIP captions of every taxon at every rank, through a CLIP text tower.

Texts (:func:`taxon_texts`). For a lineage table (one row per item or per species, columns
kingdom..species, optional ``common_name``) every taxon at a rank gets the caption of
:func:`treeprobe.training.text.make_caption` for its lineage *truncated at that rank*:

=====================  ========================================================================
text type              caption of the genus *Pica* / the species *Pica pica* ("Eurasian magpie")
=====================  ========================================================================
``taxonomic``          ``a photo of Animalia Chordata Aves Passeriformes Corvidae Pica.`` /
                       ``a photo of Animalia Chordata Aves Passeriformes Corvidae Pica pica.``
``scientific``         ``a photo of Pica.`` (the taxon's own name) / ``a photo of Pica pica.``
``common``             ``a photo of Pica.`` / ``a photo of Eurasian magpie.``
``scientific_common``  ``a photo of Pica.`` / ``a photo of Pica pica with common name Eurasian magpie.``
``taxonomic_common``   as ``taxonomic`` at the genus / ``... Pica pica with common name Eurasian magpie.``
=====================  ========================================================================

``common_name`` names the species, so it is used at the species rank only; a column
``<rank>_common_name`` (e.g. ``genus_common_name``) gives common names at another rank. Without a
common name ``common`` falls back to the scientific text and the ``..._common`` types drop their
clause (the rules of :mod:`treeprobe.training.text`). A taxon is identified by its cumulative label
(``Animalia|Chordata|Aves``, as in :class:`~treeprobe.taxonomy.Taxonomy` with
``unknown="separate"``): homonyms in two kingdoms stay two taxa; items unknown at a rank name no
taxon there. When the rows of one species disagree on the common name, the first non-empty one wins.

Templates. By default a caption is ``a photo of {}.`` (:data:`~treeprobe.training.text.TEMPLATE`,
as in training). ``templates="ensemble"`` (or any sequence of format strings with one ``{}``)
averages the unit embeddings of the caption in each template and normalises the mean again, the
prompt ensembling of CLIP (Radford et al. 2021); :data:`ENSEMBLE_TEMPLATES` is our short list of
eight such templates (a subset in the spirit of CLIP's 80 ImageNet templates, not a copy of them).

Encoding (:func:`embed_texts`). Captions are tokenized with the tokenizer of the model's
architecture (:func:`text_tokenizer`: ``open_clip.get_tokenizer(model_name)`` with the model's
context length, as ``treeprobe train`` tokenizes; the bundled ``treeprobe-tiny`` config is
registered first; for a checkpoint that carries its own config and an open_clip text transformer, the
open_clip BPE tokenizer with the model's context length; anything else is a TreeprobeError asking
for ``tokenizer=``). ``model.encode_text`` runs under ``torch.no_grad()`` in batches of
``batch_size`` unique texts; the result is float32 (n, D), rows of unit L2 norm.

Cache. Each text's vector is stored under ``<cache_dir>/text_embeddings/<model key>/`` where the
model key is a sha256 over :data:`CACHE_VERSION`, the checkpoint digest
(:attr:`~treeprobe.models.LoadedModel.digest`), the model name and precision, and each vector is
keyed by the sha256 of its text. A call writes the vectors it computed as one ``shard-*.npz``
(atomically, :func:`treeprobe._utils.atomic_write`), so a second call with the same model and texts
runs no forward pass and a new text computes only that text. ``cache_dir=None`` is the embedding
cache folder of :mod:`treeprobe.extract` (``$TREEPROBE_CACHE``, else ``~/.cache/treeprobe``);
``cache_dir=False`` turns the cache off.

Files (:func:`write_text_embeddings`, :func:`read_text_embeddings`): a parquet (or ``.npz``) of
rows ``text_type, rank, taxon`` + the vector (a list column ``embedding`` or columns ``e0..e{D-1}``).

>>> import pandas as pd
>>> lin = pd.DataFrame({"kingdom": ["Animalia"], "phylum": ["Chordata"], "class": ["Aves"],
...                     "order": ["Passeriformes"], "family": ["Corvidae"], "genus": ["Pica"],
...                     "species": ["Pica pica"], "common_name": ["Eurasian magpie"]})
>>> texts = taxon_texts(lin, "scientific", ranks=("family", "species"))
>>> texts["family"]["text"].tolist(), texts["species"]["taxon"].tolist()
(['a photo of Corvidae.'], ['Animalia|Chordata|Aves|Passeriformes|Corvidae|Pica|Pica pica'])
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from treeprobe._utils import RANKS, atomic_write, default_cache_dir, one_line
from treeprobe._validation import check_choice, check_int
from treeprobe.errors import TreeprobeError, TreeprobeWarning
from treeprobe.models import LoadedModel
from treeprobe.training.text import TEMPLATE, TEXT_TYPES, caption_body, clean

__all__ = ["TEXT_TYPES", "ENSEMBLE_TEMPLATES", "CACHE_VERSION", "DEFAULT_BATCH_SIZE", "TEXT_COLUMNS",
           "taxon_texts", "text_tokenizer", "embed_texts", "taxon_text_embeddings", "text_cache_folder",
           "embeddings_frame", "write_text_embeddings", "read_text_embeddings"]

#: Version inside every text-cache key; bump it when the cache format or the numbers change.
CACHE_VERSION = 1
#: Unique texts per forward pass.
DEFAULT_BATCH_SIZE = 256
#: Templates averaged with ``templates="ensemble"`` (CLIP-style prompt ensembling; our own short list).
ENSEMBLE_TEMPLATES = (
    "a photo of {}.",
    "a photo of the {}.",
    "a close-up photo of a {}.",
    "a bright photo of a {}.",
    "a cropped photo of the {}.",
    "a blurry photo of a {}.",
    "a good photo of the {}.",
    "a photo of a small {}.",
)
#: Key columns of a text-embedding file, in order.
TEXT_COLUMNS = ("text_type", "rank", "taxon")
_SEP = "|"
_SIMPLE_VOCAB = 49408  # open_clip's BPE vocabulary (SimpleTokenizer)


# ----------------------------------------------------------------------------- texts


def _check_ranks(ranks) -> tuple[str, ...]:
    if isinstance(ranks, str):
        ranks = (ranks,)
    ranks = tuple(ranks)
    if not ranks:
        raise TreeprobeError("no ranks given; choose from " + ", ".join(RANKS))
    for r in ranks:
        check_choice(r, "rank", RANKS)
    if len(set(ranks)) != len(ranks):
        raise TreeprobeError(f"ranks repeat: {', '.join(ranks)}")
    return tuple(r for r in RANKS if r in ranks)


def _check_text_type(text_type: str) -> str:
    if text_type == "mixed":
        raise TreeprobeError("text type 'mixed' draws a type per training batch; embed each fixed type "
                             f"instead ({', '.join(TEXT_TYPES)})")
    return check_choice(text_type, "text type", TEXT_TYPES)


def _check_template(template: str) -> str:
    if not isinstance(template, str) or template.count("{}") != 1:
        raise TreeprobeError(f"a caption template needs exactly one '{{}}'; got {template!r}")
    return template


def _lineage_frame(lineages: pd.DataFrame, ranks: tuple[str, ...]):
    """(Taxonomy over kingdom..deepest requested rank, unknown='separate')."""
    from treeprobe.taxonomy import Taxonomy

    if not isinstance(lineages, pd.DataFrame):
        raise TreeprobeError(f"lineages must be a pandas DataFrame with rank columns; got {type(lineages).__name__}")
    upto = RANKS[: RANKS.index(ranks[-1]) + 1]
    return Taxonomy.from_frame(lineages, upto, unknown="separate")


def _common_column(lineages: pd.DataFrame, rank: str) -> np.ndarray | None:
    col = "common_name" if rank == "species" else f"{rank}_common_name"
    if col not in lineages.columns:
        return None
    return np.array([clean(v) for v in lineages[col].tolist()], dtype=object)


def taxon_texts(lineages: pd.DataFrame, text_type: str, ranks: Sequence[str] = RANKS, *,
                template: str = TEMPLATE) -> dict[str, pd.DataFrame]:
    """Caption of every taxon at each rank for one text type (module docstring for the rules).

    lineages: DataFrame (N rows) with the rank columns kingdom..the deepest of ``ranks`` (optional
    ``common_name``, ``<rank>_common_name``); every row needs a kingdom. text_type: one of
    :data:`TEXT_TYPES`. template: format string with one ``{}`` around the name part.
    Returns rank → DataFrame (T_r rows, sorted by taxon) with columns ``taxon`` (cumulative label),
    ``name`` (the name at that rank), ``text`` (the caption) and ``n_items`` (rows of ``lineages``).
    """
    text_type, ranks, template = _check_text_type(text_type), _check_ranks(ranks), _check_template(template)
    tax = _lineage_frame(lineages, ranks)
    lin = tax.lineages
    src = lineages.reset_index(drop=True)
    out = {}
    for r in ranks:
        upto = RANKS[: RANKS.index(r) + 1]
        codes = tax.codes(r)
        taxa = tax.taxon_labels(r)
        known = codes >= 0
        rows = np.flatnonzero(known)
        _, at = np.unique(codes[rows], return_index=True)  # every code 0..T-1 occurs among the known rows
        first = rows[at].astype(np.int64)  # first row of each taxon
        common = _common_column(src, r)
        common_of = np.full(len(taxa), "", dtype=object)
        if common is not None:
            has = rows[common[rows] != ""]
            u, at = np.unique(codes[has], return_index=True)
            common_of[u] = common[has[at]]
        names = lin[r].to_numpy(dtype=object)
        sub = lin.loc[first, list(upto)].to_dict("records") if len(first) else []
        texts = []
        for lineage, com in zip(sub, common_of):
            if com:
                lineage["common_name"] = com
            body = caption_body(lineage, text_type)
            texts.append(template.format(body) if body else "")
        out[r] = pd.DataFrame({"taxon": taxa.astype(object), "name": names[first] if len(first) else [],
                               "text": pd.Series(texts, dtype=object),
                               "n_items": np.bincount(codes[rows], minlength=len(taxa)).astype(np.int64)})
    return out


# ----------------------------------------------------------------------------- tokenizer


def _context_length(net) -> int | None:
    ctx = getattr(net, "context_length", None)
    if ctx is None:
        ctx = getattr(getattr(net, "text", None), "context_length", None)
    return int(ctx) if ctx else None


def _text_vocab(net) -> int | None:
    emb = getattr(net, "token_embedding", None)
    if emb is None:
        emb = getattr(getattr(net, "text", None), "token_embedding", None)
    return int(emb.num_embeddings) if emb is not None else None


_TOKENIZERS: dict[tuple, Callable] = {}  # (model name, context length, vocabulary) → tokenizer, built once


def text_tokenizer(model: LoadedModel) -> Callable:
    """The tokenizer of ``model``'s text tower: list of n strings → LongTensor (n, context_length).

    Known architecture (an open_clip name, ``treeprobe-tiny``, an ``hf-hub:`` id; hub files come
    through :func:`treeprobe.models.hub_guard`, so offline fails in one line): open_clip's tokenizer
    for it, with the model's context length. A checkpoint that carries its own config (name unknown
    to open_clip) with an open_clip text transformer: the open_clip BPE tokenizer with the model's
    context length. Otherwise (a Hugging Face text tower, or a vocabulary the BPE tokenizer does not
    fit): TreeprobeError; pass ``tokenizer=`` to :func:`embed_texts` then.
    """
    _check_loaded(model)
    net, name = model.model, str(model.model_name)
    if not hasattr(net, "encode_text"):
        raise TreeprobeError(f"model {name} has no text tower (no encode_text); text embeddings need a CLIP model")
    ctx, vocab = _context_length(net), _text_vocab(net)
    key = (name, ctx, vocab)
    if key not in _TOKENIZERS:
        _TOKENIZERS[key] = _make_tokenizer(name, ctx, vocab)
    return _TOKENIZERS[key]


def _make_tokenizer(name: str, ctx: int | None, vocab: int | None) -> Callable:
    import open_clip

    from treeprobe.models import HF_HUB_PREFIX, hub_guard, resolve_model_name

    hint = "pass tokenizer= (a callable: list of str -> LongTensor (n, context_length))"
    if name.startswith(HF_HUB_PREFIX):
        with hub_guard(f"the tokenizer of {name}", hint=hint):
            return open_clip.get_tokenizer(name, context_length=ctx)
    arch = resolve_model_name(name)
    cfg = open_clip.get_model_config(arch)
    if cfg is not None:
        text_cfg = cfg.get("text_cfg", {})
        if text_cfg.get("hf_tokenizer_name"):
            with hub_guard(f"the tokenizer {text_cfg['hf_tokenizer_name']} of {name}", hint=hint):
                tok = open_clip.get_tokenizer(arch, context_length=ctx)
        else:
            tok = open_clip.get_tokenizer(arch, context_length=ctx)
        if isinstance(tok, open_clip.SimpleTokenizer) and vocab is not None and vocab < _SIMPLE_VOCAB:
            raise TreeprobeError(f"model {name} has a text vocabulary of {vocab} tokens, fewer than the "
                                 f"{_SIMPLE_VOCAB} of open_clip's tokenizer; {hint}")
        return tok
    if vocab is None or ctx is None:
        raise TreeprobeError(f"no tokenizer found for model {name}: its architecture is not an open_clip name "
                             f"and its text tower is not open_clip's transformer; {hint}")
    if vocab < _SIMPLE_VOCAB:
        raise TreeprobeError(f"no tokenizer found for model {name}: its text vocabulary has {vocab} tokens, "
                             f"not the {_SIMPLE_VOCAB} of open_clip's tokenizer; {hint}")
    return open_clip.SimpleTokenizer(context_length=ctx)


# ----------------------------------------------------------------------------- cache


def _check_loaded(model) -> None:
    if not isinstance(model, LoadedModel):
        raise TreeprobeError(f"model must be a LoadedModel (treeprobe.models.load_model); got {type(model).__name__}")


def text_cache_folder(model: LoadedModel, cache_dir=None) -> Path:
    """Folder of ``model``'s text vectors: ``<cache_dir>/text_embeddings/<sha256 of version, digest,
    model name, precision>``; ``cache_dir=None``: the embedding cache folder ($TREEPROBE_CACHE)."""
    _check_loaded(model)
    root = Path(default_cache_dir() if cache_dir is None else os.fspath(cache_dir))
    payload = json.dumps({"version": CACHE_VERSION, "digest": model.digest, "model_name": model.model_name,
                          "precision": model.precision}, sort_keys=True)
    return root / "text_embeddings" / hashlib.sha256(payload.encode()).hexdigest()


def _text_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _read_cached(folder: Path, wanted: set[str], dim: int) -> dict[str, np.ndarray]:
    """key → vector (D,) for the wanted keys found in the shards of ``folder``."""
    found: dict[str, np.ndarray] = {}
    if not folder.is_dir():
        return found
    for shard in sorted(folder.glob("shard-*.npz")):
        if len(found) == len(wanted):
            break
        try:
            with np.load(shard, allow_pickle=False) as z:
                keys = z["keys"]
                hit = np.flatnonzero([k in wanted and k not in found for k in keys.tolist()])
                if hit.size == 0:
                    continue
                emb = z["embeddings"]
                if emb.ndim != 2 or emb.shape != (len(keys), dim):
                    raise ValueError(f"embeddings of shape {emb.shape} for {len(keys)} keys of width {dim}")
                for i in hit:
                    found[str(keys[i])] = np.asarray(emb[i], dtype=np.float32)
        except Exception as e:  # noqa: BLE001 - a damaged shard is recomputed, not fatal
            warnings.warn(f"ignoring unreadable text-cache file {shard}: {one_line(e)}", TreeprobeWarning,
                          stacklevel=3)
    return found


def _write_shard(folder: Path, keys: list[str], emb: np.ndarray) -> None:
    name = hashlib.sha256("\n".join(keys).encode()).hexdigest()[:32]
    file = folder / f"shard-{name}.npz"
    arrays = dict(keys=np.array(keys, dtype="U64"), embeddings=np.ascontiguousarray(emb, dtype=np.float32))
    try:
        atomic_write(file, lambda f: np.savez(f, **arrays))
    except OSError as e:
        raise TreeprobeError(f"cannot write the text cache {file} ({e.strerror or one_line(e)}); "
                             "pass another cache_dir (or cache_dir=False)") from None


# ----------------------------------------------------------------------------- encoding


def _check_texts(texts) -> list[str]:
    if isinstance(texts, str):
        raise TreeprobeError("texts must be a sequence of strings, not one string")
    texts = list(texts)
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise TreeprobeError(f"texts must be strings; item {bad[0]} is a {type(texts[bad[0]]).__name__}")
    empty = [i for i, t in enumerate(texts) if not t.strip()]
    if empty:
        raise TreeprobeError(f"{len(empty)} empty text(s) (first: item {empty[0]}); drop them before embedding")
    return texts


def _unit_rows(emb: np.ndarray) -> np.ndarray:
    emb = np.asarray(emb, dtype=np.float32)
    norms = np.linalg.norm(emb, axis=1)
    bad = ~np.isfinite(emb).all(axis=1) | (norms == 0)
    if bad.any():
        raise TreeprobeError(f"the text tower gave {int(bad.sum())} non-finite or zero vector(s)")
    return emb / norms[:, None]


def _device_of(net) -> torch.device:
    for p in net.parameters():
        return p.device
    return torch.device("cpu")


def embed_texts(model: LoadedModel, texts: Sequence[str], *, batch_size: int = DEFAULT_BATCH_SIZE, cache_dir=None,
                progress: bool = True, tokenizer: Callable | None = None) -> np.ndarray:
    """Unit text embeddings of ``texts`` (n strings) by ``model``'s text tower: float32 (n, D).

    Repeated texts are encoded once; uncached ones run through ``model.model.encode_text`` under
    ``torch.no_grad()`` in batches of ``batch_size`` (a tqdm bar unless ``progress=False``).
    cache_dir: folder of the cache (module docstring); None: ``$TREEPROBE_CACHE`` or
    ``~/.cache/treeprobe``; False: no cache. tokenizer: overrides :func:`text_tokenizer`.

    >>> from treeprobe.models import load_model
    >>> m = load_model(model="tiny")
    >>> embed_texts(m, ["a photo of Pica pica."], cache_dir=False, progress=False).shape
    (1, 64)
    """
    _check_loaded(model)
    texts = _check_texts(texts)
    batch_size = check_int(batch_size, "batch_size")
    unique = list(dict.fromkeys(texts))
    keys = [_text_key(t) for t in unique]
    folder = None if cache_dir is False else text_cache_folder(model, cache_dir)
    dim = None
    found: dict[str, np.ndarray] = {}
    if folder is not None and folder.is_dir():
        dim = int(model.embed_dim)
        found = _read_cached(folder, set(keys), dim)
    todo = [i for i, k in enumerate(keys) if k not in found]
    if todo:
        tok = tokenizer if tokenizer is not None else text_tokenizer(model)
        new = _encode(model.model, tok, [unique[i] for i in todo], batch_size, progress)
        if folder is not None:
            _write_shard(folder, [keys[i] for i in todo], new)
        for j, i in enumerate(todo):
            found[keys[i]] = new[j]
    if not unique:
        return np.zeros((0, int(model.embed_dim)), dtype=np.float32)
    table = np.stack([found[k] for k in keys]).astype(np.float32, copy=False)
    index = {t: i for i, t in enumerate(unique)}
    return table[[index[t] for t in texts]]


def _encode(net, tokenizer: Callable, texts: list[str], batch_size: int, progress: bool) -> np.ndarray:
    from tqdm.auto import tqdm

    device = _device_of(net)
    out = []
    with torch.no_grad(), tqdm(total=len(texts), desc="text embeddings", unit="text", disable=not progress) as bar:
        for a in range(0, len(texts), batch_size):
            chunk = texts[a:a + batch_size]
            try:
                tokens = tokenizer(chunk)
            except Exception as e:  # noqa: BLE001
                raise TreeprobeError(f"cannot tokenize the texts: {one_line(e)}") from None
            feats = net.encode_text(tokens.to(device))
            out.append(_unit_rows(feats.float().cpu().numpy()))
            bar.update(len(chunk))
    return np.concatenate(out, axis=0)


def _templates(templates) -> tuple[str, ...]:
    if templates is None:
        return (TEMPLATE,)
    if isinstance(templates, str):
        if templates == "ensemble":
            return ENSEMBLE_TEMPLATES
        return (_check_template(templates),)
    out = tuple(_check_template(t) for t in templates)
    if not out:
        raise TreeprobeError("templates is empty; pass None, 'ensemble' or format strings with one '{}'")
    return out


def taxon_text_embeddings(model: LoadedModel, lineages: pd.DataFrame, *, text_types: Sequence[str] = ("taxonomic",),
                          ranks: Sequence[str] = RANKS, templates=None, batch_size: int = DEFAULT_BATCH_SIZE,
                          cache_dir=None, progress: bool = True,
                          tokenizer: Callable | None = None) -> dict[str, dict[str, tuple[list[str], np.ndarray]]]:
    """Text embedding of every taxon at each rank, for each text type.

    Returns text_type → rank → (taxa: list of T_r cumulative labels, float32 (T_r, D) unit rows).
    templates: None (``a photo of {}.``), ``"ensemble"`` (:data:`ENSEMBLE_TEMPLATES`) or a sequence
    of format strings: the unit vectors of one taxon's captions are averaged and renormalised.
    Taxa whose caption is empty are left out. All texts go through one :func:`embed_texts` call
    (shared texts encoded once; ``batch_size``, ``cache_dir``, ``progress``, ``tokenizer`` as there).
    """
    if isinstance(text_types, str):
        text_types = (text_types,)
    text_types = tuple(dict.fromkeys(_check_text_type(t) for t in text_types))
    if not text_types:
        raise TreeprobeError("no text types given; choose from " + ", ".join(TEXT_TYPES))
    ranks, temps = _check_ranks(ranks), _templates(templates)
    plan, all_texts = [], []
    for tt in text_types:
        for t_i, temp in enumerate(temps):
            for r, frame in taxon_texts(lineages, tt, ranks, template=temp).items():
                keep = (frame["text"] != "").to_numpy()
                plan.append((tt, r, t_i, frame["taxon"].to_numpy()[keep].tolist(), len(all_texts), int(keep.sum())))
                all_texts += frame["text"][keep].tolist()
    emb = embed_texts(model, all_texts, batch_size=batch_size, cache_dir=cache_dir, progress=progress,
                      tokenizer=tokenizer)
    out: dict[str, dict[str, tuple[list[str], np.ndarray]]] = {tt: {} for tt in text_types}
    sums: dict[tuple[str, str], np.ndarray] = {}
    for tt, r, t_i, taxa, start, n in plan:
        block = emb[start:start + n].astype(np.float64)
        sums[(tt, r)] = block if t_i == 0 else sums[(tt, r)] + block
        if t_i == len(temps) - 1:
            vec = sums[(tt, r)] / len(temps)
            out[tt][r] = (taxa, _unit_rows(vec) if len(temps) > 1 else vec.astype(np.float32))
    return out


# ----------------------------------------------------------------------------- files


def embeddings_frame(embeddings: Mapping[str, Mapping[str, tuple[Sequence[str], np.ndarray]]]) -> pd.DataFrame:
    """The nested result of :func:`taxon_text_embeddings` as one DataFrame: columns ``text_type``,
    ``rank``, ``taxon`` and ``embedding`` (a float32 (D,) array per row)."""
    rows = {c: [] for c in (*TEXT_COLUMNS, "embedding")}
    for tt, by_rank in embeddings.items():
        for r, (taxa, X) in by_rank.items():
            X = np.asarray(X, dtype=np.float32)
            if X.ndim != 2 or X.shape[0] != len(taxa):
                raise TreeprobeError(f"{tt}/{r}: {len(taxa)} taxa but an array of shape {X.shape}")
            rows["text_type"] += [tt] * len(taxa)
            rows["rank"] += [r] * len(taxa)
            rows["taxon"] += list(map(str, taxa))
            rows["embedding"] += list(X)
    return pd.DataFrame(rows)


def write_text_embeddings(embeddings, path) -> Path:
    """Write the result of :func:`taxon_text_embeddings` (or :func:`embeddings_frame`) to ``path``:
    ``.parquet`` (list column ``embedding``, float32) or ``.npz`` (arrays text_type, rank, taxon, embeddings
    (n, D)); atomically. Returns the path."""
    frame = embeddings if isinstance(embeddings, pd.DataFrame) else embeddings_frame(embeddings)
    path = Path(os.fspath(path))
    X = np.stack(frame["embedding"].to_list()).astype(np.float32) if len(frame) else np.zeros((0, 0), np.float32)
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        dim = X.shape[1] if X.size else 0
        cols = {c: pa.array(frame[c].astype(str).tolist(), pa.string()) for c in TEXT_COLUMNS}
        cols["embedding"] = pa.FixedSizeListArray.from_arrays(pa.array(X.reshape(-1), pa.float32()), dim) \
            if dim else pa.array([], pa.list_(pa.float32()))
        table = pa.table(cols)
        atomic_write(path, lambda f: pq.write_table(table, f))
    elif path.suffix == ".npz":
        arrays = {c: np.array(frame[c].astype(str).tolist(), dtype=str) for c in TEXT_COLUMNS}
        atomic_write(path, lambda f: np.savez(f, embeddings=X, **arrays))
    else:
        raise TreeprobeError(f"text embeddings are written as .parquet or .npz; got {path.name}")
    return path


def _read_frame(path: Path, text_type: str) -> tuple[pd.DataFrame, np.ndarray]:
    if not path.exists():
        raise TreeprobeError(f"no such text-embedding file: {path}")
    if path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except Exception as e:  # noqa: BLE001
            raise TreeprobeError(f"cannot read {path}: {one_line(e)}") from None
        if "embeddings" not in arrays:
            raise TreeprobeError(f"{path} has no 'embeddings' array (has: {', '.join(arrays) or 'nothing'})")
        frame = pd.DataFrame({k: arrays[k].astype(str) for k in TEXT_COLUMNS if k in arrays})
        X = np.asarray(arrays["embeddings"])
        if X.ndim != 2 or X.shape[0] != len(frame) and len(frame):
            raise TreeprobeError(f"{path}: embeddings of shape {X.shape} for {len(frame)} rows")
    elif path.suffix == ".parquet":
        try:
            frame = pd.read_parquet(path)
        except Exception as e:  # noqa: BLE001
            raise TreeprobeError(f"cannot read {path}: {one_line(e)}") from None
        ecols = [c for c in frame.columns if isinstance(c, str) and c[:1] == "e" and c[1:].isdigit()]
        if "embedding" in frame.columns:
            vals = frame["embedding"].to_list()
            lengths = sorted({len(v) if v is not None else 0 for v in vals})
            if len(lengths) > 1:
                raise TreeprobeError(f"{path}: embeddings have {len(lengths)} different lengths "
                                     f"({', '.join(map(str, lengths[:4]))}); all rows need the same width")
            X = np.stack([np.asarray(v, dtype=np.float64) for v in vals]) if vals else np.zeros((0, 0))
        elif ecols:
            nums = sorted(int(c[1:]) for c in ecols)
            if nums != list(range(len(nums))):
                raise TreeprobeError(f"{path}: embedding columns must be e0..e{len(nums) - 1} without gaps")
            X = frame[[f"e{i}" for i in nums]].to_numpy(dtype=np.float64)
        else:
            raise TreeprobeError(f"{path} has no 'embedding' column and no e0..eD columns")
    else:
        raise TreeprobeError(f"text embeddings are read from .parquet or .npz; got {path.name}")
    missing = [c for c in ("rank", "taxon") if c not in frame.columns]
    if missing:
        raise TreeprobeError(f"{path} has no {' / '.join(missing)} column")
    if "text_type" not in frame.columns:
        frame = frame.assign(text_type=text_type)
    return frame[list(TEXT_COLUMNS)].astype(str).reset_index(drop=True), X


def read_text_embeddings(path, *, dim: int | None = None, text_type: str = "taxonomic",
                         normalise: bool = True) -> dict[str, dict[str, tuple[list[str], np.ndarray]]]:
    """Read a file of taxon text embeddings (as :func:`write_text_embeddings` writes, or released ones).

    ``.parquet``: columns ``rank``, ``taxon``, optional ``text_type`` (``text_type`` when absent) and
    the vector as a list column ``embedding`` or columns ``e0..e{D-1}``; ``.npz``: arrays ``rank``,
    ``taxon``, optional ``text_type`` and ``embeddings`` (n, D). Returns text_type → rank → (taxa,
    float32 (T_r, D)), ranks in kingdom..species order, rows in file order; unit rows when
    ``normalise``. TreeprobeError for an unknown rank, a (text_type, rank, taxon) given twice, a width
    other than ``dim``, rows of different widths, non-finite or all-zero vectors.
    """
    frame, X = _read_frame(Path(os.fspath(path)), text_type)
    if len(frame) == 0:
        raise TreeprobeError(f"{path} holds no text embeddings")
    bad = sorted(set(frame["rank"]) - set(RANKS))
    if bad:
        raise TreeprobeError(f"{path}: unknown rank(s) {', '.join(bad[:3])}; expected {', '.join(RANKS)}")
    dup = frame.duplicated(list(TEXT_COLUMNS), keep=False)
    if dup.any():
        first = frame[dup].iloc[0]
        raise TreeprobeError(f"{path}: {int(dup.sum())} rows repeat a (text_type, rank, taxon); first: "
                             f"{first['text_type']}/{first['rank']}/{first['taxon']}")
    if X.shape[1] == 0:
        raise TreeprobeError(f"{path}: the embeddings are empty (width 0)")
    if dim is not None and X.shape[1] != check_int(dim, "dim"):
        raise TreeprobeError(f"{path}: embeddings are {X.shape[1]}-d but {dim}-d were expected")
    finite = np.isfinite(X).all(axis=1)
    if not finite.all():
        raise TreeprobeError(f"{path}: {int((~finite).sum())} embedding rows have NaN or infinite values")
    X = X.astype(np.float32)
    if normalise:
        norms = np.linalg.norm(X, axis=1)
        if (norms == 0).any():
            raise TreeprobeError(f"{path}: {int((norms == 0).sum())} embedding rows are all zeros")
        X = X / norms[:, None]
    out: dict[str, dict[str, tuple[list[str], np.ndarray]]] = {}
    for tt in dict.fromkeys(frame["text_type"]):
        sel_t = (frame["text_type"] == tt).to_numpy()
        out[tt] = {}
        for r in RANKS:
            sel = np.flatnonzero(sel_t & (frame["rank"] == r).to_numpy())
            if sel.size:
                out[tt][r] = (frame["taxon"].to_numpy()[sel].tolist(), np.ascontiguousarray(X[sel]))
    return out
