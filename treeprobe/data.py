"""Loaders: metadata CSV, iNat21-style image folder, precomputed embeddings (.npy + CSV, .parquet).

Every loader returns a :class:`~treeprobe.core.TreeData`. Pure I/O: nothing here computes
anything about the taxonomy beyond cleaning the rank strings. Problems with the input raise
:class:`~treeprobe.errors.TreeprobeError` with a one-line message.

``TreeData.items`` always has

* ``path`` -- absolute path string of the image, ``''`` when there is no image
  (e.g. precomputed embeddings);
* the 7 rank columns of :data:`~treeprobe.taxonomy.RANKS` as strings, ``''`` where missing
  (``species`` holds the binomial); the loaders keep the names as read and TreeData tidies them
  (Unicode NFC, whitespace, case variants), warning with the count of values changed;
* every other input column, kept unchanged as covariates.

``TreeData.skipped`` lists what was left out, with columns ``item`` (the path, or ``row <i>``;
for embeddings files i is the 0-based row in the source file) and ``reason``: what the loader
dropped (missing, non-finite or zero embeddings, unparseable or unreadable folders, broken image
links), then the rows TreeData sets aside (no kingdom; a second copy of an item, ``duplicate of
row K (same path)``: ``row <i>`` and K are then positions among the loaded rows). The rules for
duplicates, names and lineage conflicts are those of :class:`~treeprobe.core.TreeData`, so they
apply alike to a CSV, an iNat folder, a parquet and a .npy.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import pandas as pd

from treeprobe._utils import IMAGE_EXTENSIONS, RANKS, one_line
from treeprobe.core import SKIPPED_COLUMNS, TreeData, empty_skipped
from treeprobe.errors import TreeprobeError, TreeprobeWarning
from treeprobe.taxonomy import MISSING_TOKENS, clean_lineages

__all__ = ["load_data", "load_embeddings", "load_inat_folder", "load_metadata_csv"]

# ----------------------------------------------------------------------------- helpers


def _require_file(path) -> str:
    path = os.path.abspath(os.fspath(path))
    if not os.path.exists(path):
        raise TreeprobeError(f"no such file or folder: {path}")
    return path


def _canonical_rank_columns(df: pd.DataFrame, what: str, need_path: bool) -> pd.DataFrame:
    """Rename rank/path columns matched case-insensitively to their canonical names; check presence."""
    wanted = (("path",) if need_path else ()) + tuple(RANKS)
    lower = {}
    for c in df.columns:
        lower.setdefault(str(c).strip().lower(), c)
    renames = {lower[w]: w for w in wanted if w not in df.columns and w in lower}
    if renames:
        df = df.rename(columns=renames)
    missing = [w for w in wanted if w not in df.columns]
    if missing:
        raise TreeprobeError(
            f"{what} lacks column(s) {', '.join(missing)}; "
            f"needs {', '.join(wanted)} (found: {', '.join(map(str, df.columns[:12]))})"
        )
    return df


def _finish_items(df: pd.DataFrame, base_dir: str, missing=MISSING_TOKENS) -> pd.DataFrame:
    """Clean ranks ('' for missing), make ``path`` absolute (relative to ``base_dir``), order columns."""
    df = df.reset_index(drop=True).copy()
    df[list(RANKS)] = clean_lineages(df, missing=missing, normalise=False)  # TreeData tidies them, with a warning
    if "path" in df.columns:
        paths = df["path"].astype("string").fillna("").str.strip().astype(object)
        df["path"] = [
            os.path.normpath(os.path.join(base_dir, p)) if p else "" for p in paths
        ]
    else:
        df["path"] = ""
    first = ["path", *RANKS]
    return df[first + [c for c in df.columns if c not in first]]


def _read_csv(path: str) -> pd.DataFrame:
    try:
        df = pd.read_csv(path, dtype={c: str for c in ("path", *RANKS)})
    except pd.errors.EmptyDataError:
        raise TreeprobeError(f"metadata CSV {path} is empty") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        msg = " ".join(str(e).split())
        raise TreeprobeError(f"cannot parse metadata CSV {path}: {msg}") from None
    if len(df) == 0:
        raise TreeprobeError(f"metadata CSV {path} has a header but no rows")
    return df


# ----------------------------------------------------------------------------- loaders


def load_metadata_csv(path, *, missing=MISSING_TOKENS) -> TreeData:
    """Images listed in a CSV with columns ``path`` + the 7 ranks (+ any covariates).

    Relative paths are resolved against the CSV's folder. Rows whose image is missing
    are kept (extraction records them). Rank/path column names match case-insensitively.
    Returns a TreeData with ``X=None``.
    """
    path = _require_file(path)
    df = _canonical_rank_columns(_read_csv(path), f"metadata CSV {path}", need_path=True)
    items = _finish_items(df, os.path.dirname(path), missing)
    return TreeData(None, items, skipped=empty_skipped(), source=path, missing=missing)


def _parse_inat_folder_name(name: str) -> dict | None:
    """``00042_Animalia_Chordata_Aves_Order_Family_Genus_epithet`` → lineage dict, or None.

    ``species`` is the binomial *Genus epithet*; words after the epithet (a trinomial's subspecies,
    ``..._Parus_major_kapustini``) go to ``infraspecific`` ('' when there are none).
    """
    parts = name.split("_", 7)
    if len(parts) != 8 or not parts[0].isdigit() or any(not p.strip() for p in parts):
        return None
    cid, kingdom, phylum, klass, order, family, genus, rest = parts
    words = [w for w in rest.split("_") if w.strip()]
    return {
        "kingdom": kingdom,
        "phylum": phylum,
        "class": klass,
        "order": order,
        "family": family,
        "genus": genus,
        "species": f"{genus} {words[0]}",
        "category_id": int(cid),
        "infraspecific": " ".join(words[1:]),
    }


def _list_folder(path: str) -> list[os.DirEntry]:
    """The entries of a folder, sorted by name (raises OSError: unreadable, a symlink loop, ...)."""
    with os.scandir(path) as it:
        return sorted(it, key=lambda e: e.name)


def _entry_kind(entry: os.DirEntry) -> str:
    """'dir', 'file', 'other', or why it cannot be followed: 'is a broken symlink' / 'cannot be read: <why>'."""
    try:
        if entry.is_dir():
            return "dir"
        if entry.is_file():
            return "file"
        if entry.is_symlink():
            os.stat(entry.path)  # a dangling link is neither dir nor file: say so
        return "other"
    except FileNotFoundError:
        return "is a broken symlink"
    except OSError as e:
        return f"cannot be read: {e.strerror or one_line(e)}"


def load_inat_folder(root, *, missing=MISSING_TOKENS) -> TreeData:
    """An iNat21-style folder: one subfolder per species named
    ``<id>_<Kingdom>_<Phylum>_<Class>_<Order>_<Family>_<Genus>_<epithet>`` holding images
    (``treeprobe._utils.IMAGE_EXTENSIONS``, any case; not recursive).

    Covariates: ``category_id`` (int, the folder's number) and ``folder`` (its name); with a
    trinomial folder name (``..._Parus_major_kapustini``, warned) ``species`` is the binomial and
    ``infraspecific`` holds the rest ('' elsewhere). Set aside into ``skipped``, with the reason:
    subfolders whose name does not parse, that hold no images or cannot be read (permissions, a
    symlink loop, a broken symlink), and image entries that cannot be followed. Hidden entries and
    plain files beside the class folders are ignored. Returns a TreeData with ``X=None``; images are
    not opened here.
    """
    root = _require_file(root)
    if not os.path.isdir(root):
        raise TreeprobeError(f"{root} is not a folder")
    try:
        entries = [e for e in _list_folder(root) if not e.name.startswith(".")]
    except OSError as e:
        raise TreeprobeError(f"cannot read folder {root}: {e.strerror or one_line(e)}") from None
    kinds = {e.name: _entry_kind(e) for e in entries}
    subdirs = [e.name for e in entries if kinds[e.name] not in ("file", "other")]
    rows, skipped = [], []
    n_parsed = 0
    trinomials = []
    for name in subdirs:
        lineage = _parse_inat_folder_name(name)
        folder = os.path.join(root, name)
        if lineage is None:
            skipped.append(
                (folder, "folder name does not parse as <id>_<Kingdom>_<Phylum>_<Class>_"
                         "<Order>_<Family>_<Genus>_<epithet>")
            )
            continue
        n_parsed += 1
        if kinds[name] != "dir":
            skipped.append((folder, f"class folder {kinds[name]}"))
            continue
        try:
            images = [e for e in _list_folder(folder)
                      if e.name.lower().endswith(IMAGE_EXTENSIONS) and not e.name.startswith(".")]
        except OSError as e:
            skipped.append((folder, f"class folder cannot be read: {e.strerror or one_line(e)}"))
            continue
        files = []
        for e in images:
            kind = _entry_kind(e)
            if kind == "file":
                files.append(e.name)
            elif kind != "dir":  # a folder named like an image is not an image: ignored, like other folders
                skipped.append((e.path, f"image entry {kind}" if kind != "other" else "not a regular file"))
        if not files:
            skipped.append((folder, "no images in folder"))
            continue
        if lineage["infraspecific"]:
            trinomials.append(name)
        for f in files:
            rows.append({"path": os.path.join(folder, f), **lineage, "folder": name})
    if n_parsed == 0:
        hint = ""
        splits = [s for s in subdirs if s.lower() in {"train", "val", "test", "train_mini", "public_test"}]
        if splits:
            hint = f"; it holds split folders, pass one of them, e.g. {os.path.join(root, splits[0])}"
        raise TreeprobeError(
            f"no iNat-style class folders (<id>_<Kingdom>_..._<Genus>_<epithet>) found in {root}{hint}"
        )
    if not rows:
        raise TreeprobeError(f"no images ({'/'.join(IMAGE_EXTENSIONS)}) in the class folders of {root}")
    frame = pd.DataFrame(rows)
    if trinomials:
        warnings.warn(f"{len(trinomials)} class folder(s) name more than a binomial (e.g. {trinomials[0]!r}): "
                      "species is the binomial Genus epithet, the rest is in column 'infraspecific'",
                      TreeprobeWarning, stacklevel=2)
    else:
        frame = frame.drop(columns="infraspecific")
    items = _finish_items(frame, root, missing)
    skipped_df = pd.DataFrame(skipped, columns=list(SKIPPED_COLUMNS)) if skipped else empty_skipped()
    return TreeData(None, items, skipped=skipped_df, source=root, missing=missing)


def _stack_parquet_embeddings(path: str):
    """Read a parquet file with an ``emb`` list column → (covariate frame, float32 (M, D), row ids (M,), null rows)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise TreeprobeError(f"cannot read parquet {path}: {' '.join(str(e).split())}") from None
    if table.num_rows == 0:
        raise TreeprobeError(f"parquet {path} has no rows")
    if "emb" not in table.column_names:
        raise TreeprobeError(
            f"parquet {path} has no 'emb' column (found: {', '.join(table.column_names[:12])})"
        )
    col = table.column("emb").combine_chunks()
    if not (pa.types.is_list(col.type) or pa.types.is_large_list(col.type)
            or pa.types.is_fixed_size_list(col.type)):
        raise TreeprobeError(f"column 'emb' of {path} is {col.type}, expected a list of numbers")
    if not (pa.types.is_floating(col.type.value_type) or pa.types.is_integer(col.type.value_type)):
        raise TreeprobeError(f"column 'emb' of {path} holds {col.type.value_type}, expected numbers")
    valid = col.is_valid().to_numpy(zero_copy_only=False)
    lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)
    lengths = lengths[valid].astype(np.int64)
    dims, counts = np.unique(lengths, return_counts=True)
    if len(dims) > 1:
        desc = ", ".join(f"{c} rows of length {d}" for d, c in zip(dims, counts))
        raise TreeprobeError(f"ragged embeddings in 'emb' column of {path}: {desc}")
    if len(dims) == 0 or dims[0] == 0:
        raise TreeprobeError(f"'emb' column of {path} holds no embedding values")
    values = pc.list_flatten(col.filter(pa.array(valid))).to_numpy(zero_copy_only=False)
    emb = np.asarray(values, dtype=np.float32).reshape(-1, int(dims[0]))
    frame = table.drop_columns(["emb"]).to_pandas()
    rows = np.flatnonzero(valid)
    return frame, emb, rows, np.flatnonzero(~valid)


def _load_npy(path: str, metadata) -> tuple[pd.DataFrame, np.ndarray, str]:
    if metadata is None:
        metadata = os.path.join(os.path.dirname(path), "metadata.csv")
        if not os.path.exists(metadata):
            raise TreeprobeError(
                f"no metadata for {path}: pass metadata=path/to/metadata.csv "
                f"(or put metadata.csv beside the .npy)"
            )
    metadata = _require_file(metadata)
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as e:
        raise TreeprobeError(f"cannot read {path} as a numpy array: {' '.join(str(e).split())}") from None
    if arr.ndim != 2:
        raise TreeprobeError(f"embeddings {path} have shape {arr.shape}, expected (N, D)")
    if not np.issubdtype(arr.dtype, np.number):
        raise TreeprobeError(f"embeddings {path} have dtype {arr.dtype}, expected numbers")
    df = _canonical_rank_columns(_read_csv(metadata), f"metadata CSV {metadata}", need_path=False)
    if "emb_row" in df.columns:
        rows = pd.to_numeric(df["emb_row"], errors="coerce")
        bad = rows.isna() | (rows != rows.round()) | (rows < 0) | (rows >= len(arr))
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raise TreeprobeError(
                f"metadata {metadata} row {i}: emb_row {df['emb_row'].iloc[i]} is not a row "
                f"of {path} (which has {len(arr)} rows)"
            )
        emb = np.asarray(arr[rows.to_numpy(dtype=np.int64)], dtype=np.float32)
    else:
        if len(df) != len(arr):
            raise TreeprobeError(
                f"embeddings {path} have {len(arr)} rows but metadata {metadata} has {len(df)} "
                f"rows (add an emb_row column to map metadata rows to embedding rows)"
            )
        emb = np.asarray(arr, dtype=np.float32)
    return df, emb, os.path.dirname(metadata)


def load_embeddings(path, metadata=None, *, missing=MISSING_TOKENS) -> TreeData:
    """Precomputed embeddings with lineages.

    * ``.npy`` (N, D) + a metadata CSV (``metadata=``, else ``metadata.csv`` beside the
      .npy) with the 7 rank columns; an ``emb_row`` column maps each CSV row to an
      embedding row, otherwise the row counts must match.
    * ``.parquet`` with an ``emb`` list column (all the same length D) + rank columns;
      every other column is kept as a covariate.

    Rows with a non-finite or all-zero embedding (or a null ``emb``) are dropped and
    recorded in ``skipped``; so are rows without a kingdom (set aside by TreeData). Embeddings: float32 (N, D),
    as stored (not normalised).
    """
    path = _require_file(path)
    ext = os.path.splitext(path)[1].lower()
    skipped = []
    if ext == ".npy":
        df, emb, base = _load_npy(path, metadata)
        row_ids = np.arange(len(df))
    elif ext == ".parquet":
        if metadata is not None:
            raise TreeprobeError(
                f"metadata= is only used with .npy embeddings; {path} carries its own rank columns"
            )
        frame, emb, row_ids, null_rows = _stack_parquet_embeddings(path)
        frame = _canonical_rank_columns(frame, f"parquet {path}", need_path=False)
        base = os.path.dirname(path)
        for i in null_rows:
            skipped.append((int(i), "missing embedding", ""))
        df = frame.iloc[row_ids]
    else:
        raise TreeprobeError(f"unsupported embeddings file {path}: expected .npy or .parquet")

    df = _finish_items(df, base, missing)
    finite = np.isfinite(emb).all(axis=1)
    zero = finite & ~np.any(emb != 0, axis=1)
    keep = finite & ~zero
    for i in np.flatnonzero(~finite):
        skipped.append((int(row_ids[i]), "non-finite embedding", df["path"].iat[i]))
    for i in np.flatnonzero(zero):
        skipped.append((int(row_ids[i]), "zero-norm embedding", df["path"].iat[i]))
    records = [(p or f"row {row}", reason) for row, reason, p in sorted(skipped, key=lambda r: r[0])]
    skipped_df = pd.DataFrame(records, columns=list(SKIPPED_COLUMNS)) if records else empty_skipped()
    if not keep.all():
        df = df.iloc[np.flatnonzero(keep)].reset_index(drop=True)
        emb = emb[keep]
    if len(df) == 0:
        raise TreeprobeError(f"no usable embeddings in {path} (all {len(records)} rows skipped)")
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    return TreeData(emb, df, skipped=skipped_df, source=path, missing=missing)


def load_data(path, embeddings: bool = False, *, missing=MISSING_TOKENS) -> TreeData:
    """Load whatever ``path`` is (``missing``: rank values read as unknown): a folder → :func:`load_inat_folder`; ``.csv`` →
    :func:`load_metadata_csv`; ``.npy``/``.parquet`` → :func:`load_embeddings`.

    ``embeddings=True`` requires the result to carry embeddings (an image folder or
    image CSV is then an error).
    """
    if path is None or str(path) == "":
        raise TreeprobeError("no data path given")
    path = _require_file(path)
    ext = os.path.splitext(path)[1].lower()
    if os.path.isdir(path):
        ds = load_inat_folder(path, missing=missing)
    elif ext == ".csv":
        ds = load_metadata_csv(path, missing=missing)
    elif ext in (".npy", ".parquet"):
        ds = load_embeddings(path, missing=missing)
    else:
        raise TreeprobeError(
            f"don't know how to read {path}: expected an image folder, a .csv, a .npy or a .parquet"
        )
    if embeddings and ds.X is None:
        raise TreeprobeError(
            f"{path} lists images, not embeddings: pass a .npy (+ metadata.csv) or .parquet, "
            f"or extract embeddings with a model first"
        )
    return ds
