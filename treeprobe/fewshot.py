"""Few-shot classification per rank (1-shot and 5-shot, as in the BioCLIP paper), with splits on disk.

Protocol (:func:`fewshot_splits`, :func:`fewshot_eval`). For each seed, rank r and shot count k, every
taxon of rank r with enough images gets k *support* images drawn at random; its other images are
*queries*. Taxa with fewer than k + 1 images are excluded (and counted). The queries of all taxa
are classified among the evaluated taxa of that rank by

* ``simpleshot`` — SimpleShot (Wang et al. 2019, CL2N): subtract the mean of the support
  embeddings from support and queries, L2-normalise both, and assign each query to the taxon whose
  support centroid (mean of its normalised support vectors) is nearest in Euclidean distance;
* ``logistic`` — a multinomial logistic-regression probe (scikit-learn ``LogisticRegression``,
  lbfgs, fixed ``C`` = :data:`LOGISTIC_C`, ``random_state`` = the seed) fitted on the support.

Embeddings are L2-normalised first (the cosine geometry CLIP features are used in). Accuracy is the
share of queries classified correctly; chance is 1 / (number of taxa evaluated). :func:`fewshot_eval`
reports it per seed and as mean, sd (ddof 1), min and max over seeds for each (rank, k, method).

Species structure (``support_species``). ``"any"`` (the default, the BioCLIP protocol): support
images are drawn among all images of the taxon, so at the genus a query often shares its species
with a support image, which makes higher ranks easy. ``"disjoint"``: at ranks above species the
query images come only from species that have no support image. One *query species* is drawn among
those whose removal leaves at least k images; the other species are walked in random order and
taken whole into a support pool until it holds at least k images; k support images are drawn from
the pool, the rest of the pool is ``unused``, and every image of the species not taken is a query.
A taxon is evaluated when it has at least two species and all its images but those of its smallest
species number at least k. Items unknown at species count as species of their own. At the species
rank ``"disjoint"`` is the same as ``"any"``.

Splits file (:func:`write_splits`, :func:`read_splits`): a CSV with columns :data:`SPLIT_COLUMNS`
(``seed, rank, k, item, taxon, role``; role ``support``, ``query``, ``unused`` or ``excluded``), one row
per item known at the rank, for every (seed, rank, k). The same seed gives the same bytes, and the
file read back reruns exactly (``fewshot_eval(..., splits=read_splits(path))``). Each (seed, rank, k)
draws from its own generator ``np.random.default_rng([seed, rank index, k])``, so a subset of ranks
or shot counts gives the same splits for what it shares with a full run.

>>> import numpy as np, pandas as pd
>>> lin = pd.DataFrame({"kingdom": ["A"] * 6, "genus": ["g", "g", "g", "h", "h", "h"]})
>>> X = np.array([[1, 0], [1, .1], [.9, 0], [0, 1], [.1, 1], [0, .9]])
>>> res = fewshot_eval(X, lin, ranks=("genus",), ks=(1,), seeds=2, methods=("simpleshot",))
>>> res.summary[["rank", "k", "method", "mean", "n_taxa", "chance"]].to_dict("records")
[{'rank': 'genus', 'k': 1, 'method': 'simpleshot', 'mean': 1.0, 'n_taxa': 2, 'chance': 0.5}]
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from treeprobe._utils import RANKS, SEED_BOUND, atomic_write_text, l2_normalise
from treeprobe._validation import check_choice, check_embeddings, check_int
from treeprobe.errors import TreeprobeError

__all__ = ["METHODS", "SUPPORT_SPECIES", "ROLES", "SPLIT_COLUMNS", "DEFAULT_KS", "DEFAULT_SEEDS", "LOGISTIC_C",
           "FewShotResult", "simpleshot_predict", "logistic_predict", "fewshot_splits", "write_splits",
           "read_splits", "fewshot_eval", "summarise"]

#: Classifiers of :func:`fewshot_eval`.
METHODS = ("simpleshot", "logistic")
#: How support images relate to the species of the queries (module docstring); the first is the default.
SUPPORT_SPECIES = ("any", "disjoint")
#: Roles of an item in a split.
ROLES = ("support", "query", "unused", "excluded")
#: Columns of a splits file, in order.
SPLIT_COLUMNS = ("seed", "rank", "k", "item", "taxon", "role")
#: Shot counts of the BioCLIP paper.
DEFAULT_KS = (1, 5)
#: Seeds 0..DEFAULT_SEEDS-1 when ``seeds`` is an int or None.
DEFAULT_SEEDS = 5
#: Inverse regularisation strength of the logistic probe (scikit-learn's default).
LOGISTIC_C = 1.0
_LOGISTIC_MAX_ITER = 1000


# ----------------------------------------------------------------------------- classifiers


def _check_support(support, labels, query) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    S = check_embeddings(support, "support embeddings")
    Q = check_embeddings(query, "query embeddings")
    y = np.asarray(labels)
    if y.shape != (S.shape[0],):
        raise TreeprobeError(f"support labels have shape {y.shape}; expected ({S.shape[0]},)")
    if S.shape[1] != Q.shape[1]:
        raise TreeprobeError(f"support embeddings are {S.shape[1]}-d but queries {Q.shape[1]}-d")
    if S.shape[0] == 0:
        raise TreeprobeError("no support embeddings")
    return S.astype(np.float64), y, Q.astype(np.float64)


def _unit(X: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(X, axis=1, keepdims=True)
    return X / np.where(n > 0, n, 1.0)


def simpleshot_predict(support, labels, query) -> np.ndarray:
    """SimpleShot (CL2N) labels of ``query`` (Q, D) from ``support`` (S, D) with ``labels`` (S,).

    Both are centred on the support mean and L2-normalised (a zero vector stays zero); each query
    gets the label whose centroid (mean normalised support vector) is nearest (Euclidean; ties: the
    smallest label). Returns (Q,) labels, of the dtype of ``labels``.

    >>> simpleshot_predict([[1.0, 0.0], [0.0, 1.0]], ["a", "b"], [[0.9, 0.2], [0.1, 3.0]]).tolist()
    ['a', 'b']
    """
    S, y, Q = _check_support(support, labels, query)
    mu = S.mean(axis=0)
    S, Q = _unit(S - mu), _unit(Q - mu)
    classes, inv = np.unique(y, return_inverse=True)
    C = np.zeros((len(classes), S.shape[1]))
    np.add.at(C, inv, S)
    C /= np.bincount(inv, minlength=len(classes))[:, None]
    d2 = (Q * Q).sum(1)[:, None] - 2.0 * Q @ C.T + (C * C).sum(1)[None, :]
    return classes[np.argmin(d2, axis=1)]


def logistic_predict(support, labels, query, *, C: float = LOGISTIC_C, seed: int = 0) -> np.ndarray:
    """Labels of ``query`` (Q, D) from a multinomial logistic regression fitted on ``support`` (S, D)
    with ``labels`` (S,): scikit-learn ``LogisticRegression(C=C, max_iter=1000, random_state=seed)``
    (lbfgs). Needs at least two labels. Returns (Q,) labels.

    >>> logistic_predict([[1.0, 0.0], [0.0, 1.0]], [0, 1], [[0.9, 0.2]]).tolist()
    [0]
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    S, y, Q = _check_support(support, labels, query)
    if len(np.unique(y)) < 2:
        raise TreeprobeError("a logistic probe needs support images of at least two taxa")
    if not (isinstance(C, (int, float)) and np.isfinite(C) and C > 0):
        raise TreeprobeError(f"C must be a positive number; got {C!r}")
    clf = LogisticRegression(C=float(C), max_iter=_LOGISTIC_MAX_ITER, random_state=int(seed))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.filterwarnings("ignore", message="The number of unique classes is greater than 50%")
        clf.fit(S, y)
    return clf.predict(Q)


# ----------------------------------------------------------------------------- splits


def _taxonomy(taxonomy):
    from treeprobe.taxonomy import Taxonomy

    if isinstance(taxonomy, Taxonomy):
        return taxonomy
    if isinstance(taxonomy, pd.DataFrame):
        ranks = tuple(r for r in RANKS if r in taxonomy.columns)
        if not ranks:
            raise TreeprobeError(f"the lineage table has no rank column ({', '.join(RANKS)})")
        return Taxonomy.from_frame(taxonomy, ranks, unknown="separate")
    raise TreeprobeError(f"taxonomy must be a Taxonomy or a lineage DataFrame; got {type(taxonomy).__name__}")


def _check_ranks(ranks, tax) -> tuple[str, ...]:
    if isinstance(ranks, str):
        ranks = (ranks,)
    ranks = tuple(ranks)
    if not ranks:
        raise TreeprobeError("no ranks given")
    for r in ranks:
        check_choice(r, "rank", RANKS)
        if r not in tax.ranks:
            raise TreeprobeError(f"rank {r!r} is not in the lineages (they have {', '.join(tax.ranks)})")
    if len(set(ranks)) != len(ranks):
        raise TreeprobeError(f"ranks repeat: {', '.join(ranks)}")
    return tuple(r for r in RANKS if r in ranks)


def _check_ks(ks) -> tuple[int, ...]:
    ks = (ks,) if isinstance(ks, (int, np.integer)) else tuple(ks)
    if not ks:
        raise TreeprobeError("no shot counts (ks) given")
    ks = tuple(check_int(k, "k") for k in ks)
    if len(set(ks)) != len(ks):
        raise TreeprobeError(f"shot counts repeat: {ks}")
    return tuple(sorted(ks))


def _check_seeds(seeds) -> tuple[int, ...]:
    if seeds is None:
        seeds = DEFAULT_SEEDS
    if isinstance(seeds, (int, np.integer)) and not isinstance(seeds, bool):
        seeds = range(check_int(seeds, "seeds"))
    seeds = tuple(check_int(s, "seed", minimum=0) for s in seeds)
    if not seeds:
        raise TreeprobeError("no seeds given")
    if len(set(seeds)) != len(seeds):
        raise TreeprobeError(f"seeds repeat: {seeds}")
    if max(seeds) >= SEED_BOUND:
        raise TreeprobeError(f"seeds must be below {SEED_BOUND}")
    return seeds


def _item_ids(items, n: int) -> np.ndarray:
    if items is None:
        return np.arange(n).astype(str).astype(object)
    ids = np.asarray(pd.Series(items).astype(str), dtype=object)
    if ids.shape != (n,):
        raise TreeprobeError(f"{len(ids)} item ids for {n} items")
    if len(set(ids.tolist())) != n:
        raise TreeprobeError("item ids repeat; each item needs its own id")
    return ids


def _draw_any(members: np.ndarray, k: int, rng) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    if len(members) < k + 1:
        return None
    perm = rng.permutation(members)
    return perm[:k], perm[k:], perm[:0]


def _draw_disjoint(members: np.ndarray, groups: np.ndarray, k: int, rng):
    uniq, inv = np.unique(groups, return_inverse=True)
    sizes = np.bincount(inv)
    total = len(members)
    if len(uniq) < 2 or total - sizes.min() < k:
        return None
    candidates = np.flatnonzero(total - sizes >= k)
    q = candidates[rng.integers(len(candidates))]
    others = rng.permutation(np.delete(np.arange(len(uniq)), q))
    pool, taken = [], []
    for g in others:
        pool.extend(members[inv == g].tolist())
        taken.append(g)
        if len(pool) >= k:
            break
    pool = np.array(pool, dtype=members.dtype)
    pick = rng.choice(len(pool), size=k, replace=False)
    support = pool[np.sort(pick)]
    unused = np.setdiff1d(pool, support)
    query = members[~np.isin(inv, taken)]
    return support, query, unused


def fewshot_splits(taxonomy, *, ks: Sequence[int] = DEFAULT_KS, ranks: Sequence[str] = RANKS, seeds=DEFAULT_SEEDS,
                   support_species: str = "any", items=None) -> pd.DataFrame:
    """Seeded support/query splits (module docstring for the protocol).

    taxonomy: a :class:`~treeprobe.taxonomy.Taxonomy` or a lineage DataFrame (N rows; read with
    ``unknown="separate"``). ks: shot counts. seeds: an int n (seeds 0..n-1) or the seeds.
    items: N item ids (default: the row numbers 0..N-1). Returns a DataFrame with
    :data:`SPLIT_COLUMNS`, one row per (seed, rank, k) and item known at the rank, items in row order.
    """
    tax = _taxonomy(taxonomy)
    ranks, ks, seeds = _check_ranks(ranks, tax), _check_ks(ks), _check_seeds(seeds)
    check_choice(support_species, "support_species", SUPPORT_SPECIES)
    n = tax.n_items
    ids = _item_ids(items, n)
    species = tax.codes("species") if "species" in tax.ranks else None
    if species is not None:  # unknown species: a group of its own
        species = np.where(species >= 0, species, -1 - np.arange(n))
    frames = []
    role_names = np.array(ROLES, dtype=object)
    for seed in seeds:
        for r in ranks:
            codes, labels = tax.codes(r), tax.labels(r)
            known = np.flatnonzero(codes >= 0)
            order = known[np.argsort(codes[known], kind="stable")]
            bounds = np.flatnonzero(np.diff(codes[order])) + 1
            by_taxon = np.split(order, bounds) if order.size else []
            disjoint = support_species == "disjoint" and r != "species" and species is not None
            for k in ks:
                rng = np.random.default_rng([seed, RANKS.index(r), k])
                role = np.full(n, -1, dtype=np.int64)
                for members in by_taxon:
                    drawn = _draw_disjoint(members, species[members], k, rng) if disjoint else \
                        _draw_any(members, k, rng)
                    if drawn is None:
                        role[members] = 3
                        continue
                    for code, part in enumerate(drawn):
                        role[part] = code
                rows = known  # row order
                frames.append(pd.DataFrame({"seed": seed, "rank": r, "k": k, "item": ids[rows],
                                            "taxon": labels[rows], "role": role_names[role[rows]]}))
    return pd.concat(frames, ignore_index=True)[list(SPLIT_COLUMNS)]


def _splits_csv(splits: pd.DataFrame) -> str:
    buf = io.StringIO()
    splits[list(SPLIT_COLUMNS)].to_csv(buf, index=False, lineterminator="\n")
    return buf.getvalue()


def write_splits(splits: pd.DataFrame, path) -> Path:
    """Write ``splits`` (:func:`fewshot_splits`) as a CSV at ``path``, atomically; same splits, same bytes."""
    _validate_splits(splits, str(path))
    return atomic_write_text(Path(os.fspath(path)), _splits_csv(splits))


def _validate_splits(df: pd.DataFrame, where: str) -> pd.DataFrame:
    missing = [c for c in SPLIT_COLUMNS if c not in df.columns]
    if missing:
        raise TreeprobeError(f"splits {where} lack column(s) {', '.join(missing)} (need {', '.join(SPLIT_COLUMNS)})")
    if len(df) == 0:
        raise TreeprobeError(f"splits {where} are empty")
    df = df[list(SPLIT_COLUMNS)].copy()
    for c in ("seed", "k"):
        v = pd.to_numeric(df[c], errors="coerce")
        if v.isna().any() or (v != np.round(v)).any() or (v < (1 if c == "k" else 0)).any():
            raise TreeprobeError(f"splits {where}: column {c} must hold integers >= {1 if c == 'k' else 0}")
        df[c] = v.astype(np.int64)
    for c in ("rank", "item", "taxon", "role"):
        df[c] = df[c].astype(str)
    bad = sorted(set(df["rank"]) - set(RANKS))
    if bad:
        raise TreeprobeError(f"splits {where}: unknown rank(s) {', '.join(bad[:3])}")
    bad = sorted(set(df["role"]) - set(ROLES))
    if bad:
        raise TreeprobeError(f"splits {where}: unknown role(s) {', '.join(bad[:3])}; expected {', '.join(ROLES)}")
    dup = df.duplicated(["seed", "rank", "k", "item"])
    if dup.any():
        row = df[dup].iloc[0]
        raise TreeprobeError(f"splits {where}: item {row['item']} appears twice in seed {row['seed']}, "
                             f"rank {row['rank']}, k {row['k']}")
    sup = df[df["role"] == "support"].groupby(["seed", "rank", "k", "taxon"]).size().reset_index(name="n")
    wrong = sup[sup["n"] != sup["k"]]
    if len(wrong):
        row = wrong.iloc[0]
        raise TreeprobeError(f"splits {where}: taxon {row['taxon']} has {row['n']} support items at k={row['k']} "
                             f"(seed {row['seed']}, rank {row['rank']})")
    return df


def read_splits(path) -> pd.DataFrame:
    """Splits written by :func:`write_splits`, validated (columns, integer seeds and k, known ranks and
    roles, an item once per (seed, rank, k), exactly k support items per evaluated taxon)."""
    path = Path(os.fspath(path))
    if not path.is_file():
        raise TreeprobeError(f"no such splits file: {path}")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as e:  # noqa: BLE001
        raise TreeprobeError(f"cannot read splits {path}: {' '.join(str(e).split())[:200]}") from None
    return _validate_splits(df, str(path))


# ----------------------------------------------------------------------------- evaluation


@dataclass
class FewShotResult:
    """What :func:`fewshot_eval` returns.

    per_seed: one row per (seed, rank, k, method): accuracy (share of queries right), n_correct,
        n_queries, n_taxa (evaluated), chance (1 / n_taxa), n_excluded_taxa, n_excluded_items.
    summary: one row per (rank, k, method): mean, sd (ddof 1), min, max of accuracy over seeds,
        n_seeds, n_taxa, chance, n_excluded_taxa (see :func:`summarise`).
    splits: the splits used (:data:`SPLIT_COLUMNS`); write them with :meth:`write_splits`.
    params: methods, support_species, C.
    """

    per_seed: pd.DataFrame
    summary: pd.DataFrame
    splits: pd.DataFrame
    params: dict = field(default_factory=dict)

    def write_splits(self, path) -> Path:
        """Write :attr:`splits` as a CSV (:func:`write_splits`)."""
        return write_splits(self.splits, path)


def summarise(per_seed: pd.DataFrame) -> pd.DataFrame:
    """Mean, sd (ddof 1; NaN for one seed), min and max of ``accuracy`` over seeds per (rank, k, method),
    with n_seeds, n_taxa, chance and n_excluded_taxa (their means over seeds), ranks top first."""
    keys = ["rank", "k", "method"]
    g = per_seed.groupby(keys, sort=False)
    out = g["accuracy"].agg(mean="mean", sd=lambda a: a.std(ddof=1) if a.notna().sum() > 1 else np.nan,
                            min="min", max="max", n_seeds="count").reset_index()
    extra = g[["n_taxa", "chance", "n_excluded_taxa"]].mean().reset_index()
    out = out.merge(extra, on=keys)
    for c in ("n_taxa", "n_excluded_taxa"):
        if (out[c] == np.round(out[c])).all():
            out[c] = out[c].astype(np.int64)
    order = {r: i for i, r in enumerate(RANKS)}
    out = out.sort_values(["rank", "k", "method"], key=lambda s: s.map(order) if s.name == "rank" else s,
                          kind="stable")
    return out.reset_index(drop=True)


def _check_methods(methods) -> tuple[str, ...]:
    methods = (methods,) if isinstance(methods, str) else tuple(methods)
    if not methods:
        raise TreeprobeError("no methods given; choose from " + ", ".join(METHODS))
    for m in methods:
        check_choice(m, "few-shot method", METHODS)
    return tuple(dict.fromkeys(methods))


def _splits_for(splits, tax, ids, ks, ranks, seeds) -> pd.DataFrame:
    """Validated given splits, restricted to the ks/ranks/seeds asked for, checked against the data."""
    df = _validate_splits(splits, "given")
    wanted = (("k", None if ks is None else _check_ks(ks)), ("rank", None if ranks is None else _check_ranks(ranks, tax)),
              ("seed", None if seeds is None else _check_seeds(seeds)))
    for col, want in wanted:
        if want is None:
            continue
        absent = sorted(set(want) - set(df[col]))
        if absent:
            raise TreeprobeError(f"the splits hold no {col} {absent[0]!r}")
        df = df[df[col].isin(want)]
    row_of = {v: i for i, v in enumerate(ids.tolist())}
    unknown = ~df["item"].isin(set(row_of))
    if unknown.any():
        raise TreeprobeError(f"the splits name {int(unknown.sum())} item(s) not in these data "
                             f"(first: {df.loc[unknown, 'item'].iloc[0]}); pass the same items= ids")
    for r in df["rank"].unique():
        if r not in tax.ranks:
            raise TreeprobeError(f"the splits use rank {r!r}, which these lineages lack")
        sel = df["rank"] == r
        rows = df.loc[sel, "item"].map(row_of).to_numpy()
        if not np.array_equal(tax.labels(r)[rows].astype(str), df.loc[sel, "taxon"].to_numpy()):
            raise TreeprobeError(f"the splits' taxa at {r} differ from these data's lineages; "
                                 "they were made for other data")
    return df.reset_index(drop=True)


def fewshot_eval(embeddings, taxonomy, *, ks: Sequence[int] | None = None, ranks: Sequence[str] | None = None,
                 seeds=None, methods: Sequence[str] = METHODS, support_species: str = "any", splits=None,
                 items=None, C: float = LOGISTIC_C) -> FewShotResult:
    """k-shot accuracy per rank of ``embeddings`` (N, D) against ``taxonomy`` (a Taxonomy or lineage
    DataFrame of the same N items), for each seed and method (module docstring for the protocol).

    ks (default (1, 5)), ranks (default all seven), seeds (an int n: 0..n-1, default 5) and
    support_species (``"any"`` or ``"disjoint"``) make the splits (:func:`fewshot_splits`); with
    ``splits`` (e.g. :func:`read_splits`) those are used instead, restricted to the ks/ranks/seeds
    given. items: N item ids that the splits name (default the row numbers). C: of the logistic probe.
    """
    X = check_embeddings(embeddings)
    tax = _taxonomy(taxonomy)
    if tax.n_items != X.shape[0]:
        raise TreeprobeError(f"{X.shape[0]} embeddings but {tax.n_items} lineages")
    methods = _check_methods(methods)
    ids = _item_ids(items, X.shape[0])
    check_choice(support_species, "support_species", SUPPORT_SPECIES)
    given = splits
    if splits is None:
        splits = fewshot_splits(tax, ks=DEFAULT_KS if ks is None else ks, ranks=RANKS if ranks is None else ranks,
                                seeds=seeds, support_species=support_species, items=ids)
    else:
        splits = _splits_for(splits, tax, ids, ks, ranks, seeds)
    if "logistic" in methods and not (isinstance(C, (int, float)) and np.isfinite(C) and C > 0):
        raise TreeprobeError(f"C must be a positive number; got {C!r}")
    U = l2_normalise(X, dtype=np.float64)
    row_of = pd.Series(np.arange(len(ids)), index=ids)
    records = []
    for (seed, r, k), part in splits.groupby(["seed", "rank", "k"], sort=False):
        rows = row_of[part["item"].to_numpy()].to_numpy()
        role = part["role"].to_numpy()
        codes = tax.codes(r)[rows]
        sup, qry = role == "support", role == "query"
        excl = role == "excluded"
        n_taxa = len(np.unique(codes[sup]))
        base = dict(seed=int(seed), rank=r, k=int(k), n_queries=int(qry.sum()), n_taxa=n_taxa,
                    chance=1.0 / n_taxa if n_taxa else np.nan, n_excluded_taxa=len(np.unique(codes[excl])),
                    n_excluded_items=int(excl.sum()))
        if n_taxa < 2:
            for m in methods:
                records.append(dict(base, method=m, accuracy=np.nan, n_correct=0))
            continue
        S, yS, Q, yQ = U[rows[sup]], codes[sup], U[rows[qry]], codes[qry]
        for m in methods:
            pred = simpleshot_predict(S, yS, Q) if m == "simpleshot" else \
                logistic_predict(S, yS, Q, C=C, seed=int(seed))
            right = int((pred == yQ).sum())
            records.append(dict(base, method=m, accuracy=right / len(yQ), n_correct=right))
    cols = ["seed", "rank", "k", "method", "accuracy", "n_correct", "n_queries", "n_taxa", "chance",
            "n_excluded_taxa", "n_excluded_items"]
    per_seed = pd.DataFrame(records)[cols]
    for k, part in per_seed.groupby("k"):
        if part["accuracy"].isna().all():
            raise TreeprobeError(f"k={k} is larger than the taxa allow: at no rank do two taxa have k + 1 = "
                                 f"{k + 1} images (or, with support_species='disjoint', two species)")
    return FewShotResult(per_seed=per_seed, summary=summarise(per_seed), splits=splits,
                         params=dict(methods=methods, support_species=support_species if given is None else "from splits",
                                     C=float(C)))
