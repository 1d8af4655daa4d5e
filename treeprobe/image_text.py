"""The image-text side of a :class:`~treeprobe.core.TreeData`: zero-shot per rank, how far wrong the mistakes
are, few-shot, and the text tower's own tree, from the data's image embeddings and the text embeddings of its
taxa (the glue between the array functions of :mod:`treeprobe.zeroshot`, :mod:`treeprobe.mistakes`,
:mod:`treeprobe.fewshot`, :mod:`treeprobe.text_tree` and the tools of :mod:`treeprobe.tl`).

Text embeddings are a nested mapping ``text_type → rank → (taxa, (T_r, D) array)`` with cumulative taxon
labels (``Animalia|Chordata|...``), as :func:`treeprobe.text_embed.taxon_text_embeddings` computes and
:func:`treeprobe.text_embed.read_text_embeddings` reads.

**Candidates.** The candidate species are the species of the data's items (a closed-set zero-shot among
what the data holds, as the BioCLIP paper's per-rank evaluation); the candidates at a rank are the taxa of
those species. Items whose species is unknown have no true class and are left out (counted).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from treeprobe.errors import TreeprobeError

__all__ = ["lineage_table", "hierarchy_of", "align_to_hierarchy", "text_type_of", "zeroshot_tables",
           "text_tree_tables"]


def lineage_table(data) -> pd.DataFrame:
    """The items' rank columns (and ``common_name`` / ``<rank>_common_name`` when present): the lineages that
    name the taxa (N rows)."""
    ranks = list(data.taxonomy.ranks)
    extra = [c for c in data.items.columns
             if c == "common_name" or (c.endswith("_common_name") and c[: -len("_common_name")] in ranks)]
    return data.items[ranks + extra].reset_index(drop=True)


def hierarchy_of(data):
    """(ClassHierarchy of the data's species, truth (N,) int64 species index per item (−1: species unknown))."""
    from treeprobe.zeroshot import ClassHierarchy

    lin = lineage_table(data)
    ranks = tuple(data.taxonomy.ranks)
    from treeprobe.taxonomy import Taxonomy

    tax = Taxonomy.from_frame(lin, ranks, unknown="separate", missing=data.missing)  # placeholders never name a taxon
    known = tax.known(ranks[-1]) & tax.known(ranks[0])
    if known.sum() == 0:
        raise TreeprobeError(f"no item has a known {ranks[-1]}: zero-shot needs named species")
    h = ClassHierarchy.from_lineages(lin[known], ranks=ranks, missing=data.missing)
    truth = h.species_index(lin, missing=data.missing)
    return h, truth


def text_type_of(text: Mapping, text_type: str | None) -> str:
    """The text type to use: ``text_type`` (checked against those present) or the only / first one."""
    if not text:
        raise TreeprobeError("no text embeddings: run tl.text_embeddings first (or pass a text-embedding file)")
    if text_type is None:
        return next(iter(text))
    if text_type not in text:
        raise TreeprobeError(f"no text embeddings of type {text_type!r}; have {', '.join(text)}")
    return text_type


def align_to_hierarchy(hierarchy, by_rank: Mapping[str, tuple[Sequence[str], np.ndarray]]) -> dict:
    """rank → float32 (T_r, D) in the order of ``hierarchy.taxa[rank]`` (ranks the text lacks are left out);
    raises naming the first taxa without a text embedding."""
    from treeprobe.text_tree import align_text_embeddings

    return align_text_embeddings(hierarchy, {r: by_rank[r] for r in hierarchy.ranks if r in by_rank})


def zeroshot_tables(X: np.ndarray, hierarchy, truth: np.ndarray, *, text: Mapping, modes, k: int,
                    logit_scale: float, n_boot: int, seed: int, rank_lengths=None) -> dict:
    """Zero-shot and mistake severity of the images ``X`` (N, D) with true species ``truth`` (N,; −1 left
    out) for one text type (``text``: rank → (taxa, array)). Returns ``{"zeroshot": DataFrame (rank × mode),
    "mistakes": DataFrame (metric rows), "mistake_depths": DataFrame (depth histogram), "result":
    ZeroShotResult, "n_unknown_species": int}``; mistakes are scored on the ``species_summed`` top-1 species
    (the flat species ranking: the same arg-max) when species were scored."""
    from treeprobe.mistakes import mistake_summary
    from treeprobe.zeroshot import zeroshot

    keep = truth >= 0
    aligned = align_to_hierarchy(hierarchy, text)
    res = zeroshot(X[keep], aligned, hierarchy, truth=truth[keep], modes=modes, logit_scale=logit_scale, k=k,
                   n_boot=n_boot, seed=seed)
    out = dict(zeroshot=res.table, result=res, n_unknown_species=int((~keep).sum()))
    if res.species_topk is not None:
        mode = "species_summed" if "species_summed" in res.predictions else "flat"
        pred = res.predictions[mode][:, -1]
        ms = mistake_summary(truth[keep], pred, hierarchy, topk=res.species_topk, k=res.species_topk.shape[1],
                             rank_lengths=rank_lengths, n_boot=n_boot, seed=seed)
        out.update(mistakes=ms["summary"], mistake_depths=ms["histogram"])
    return out


def text_tree_tables(data, hierarchy, truth: np.ndarray, *, text: Mapping, permutations: int, seed: int,
                     bootstrap: int, tree_method: str = "upgma") -> dict:
    """The text tower's tree: the species-name text embeddings as a data set (one item per candidate
    species) scored against the taxonomy (Mantel r, K_mult, recovered-tree scores), and image-text alignment
    per rank of the data's images. Returns ``{"text_tree": DataFrame (statistic rows), "alignment": DataFrame
    (rank rows)}``."""
    from treeprobe import tl
    from treeprobe.text_tree import image_text_alignment, text_tree_data

    ranks = hierarchy.ranks
    aligned = align_to_hierarchy(hierarchy, text)
    rows = []
    if ranks[-1] in aligned and hierarchy.n_species >= 4:
        lin = lineage_table(data)
        first = pd.Series(np.arange(len(truth)))[truth >= 0].groupby(truth[truth >= 0]).first()
        species_lin = lin.iloc[first.sort_index().to_numpy()][list(ranks)].reset_index(drop=True)
        td = text_tree_data(aligned[ranks[-1]], species_lin, text="species names")
        m = tl.mantel(td, methods=("pearson",), levels=("image",), permute=("species",), permutations=permutations,
                      seed=seed)
        r0 = m.iloc[0]
        rows.append(dict(statistic="Mantel r (text distance vs tree distance)", value=r0["statistic"],
                         p_value=r0["p_value"], chance=0.0, n=int(hierarchy.n_species),
                         permuted="species among tree positions"))
        ks = tl.physignal(td, permutations=permutations, seed=seed)
        rows.append(dict(statistic="K_mult of the species-name embeddings", value=ks.statistic,
                         p_value=ks.p_value, chance=np.nan, n=int(hierarchy.n_species), permuted=str(ks.permuted)))
        tr = tl.tree_recovery(td, method=tree_method, levels=("species",), permutations=permutations, seed=seed)
        srow = tr.summary.iloc[0]
        rows.append(dict(statistic=f"cophenetic r of the recovered tree ({tree_method})", value=srow["cophenetic_r"],
                         p_value=srow["cophenetic_r_p"], chance=srow["cophenetic_r_null"], n=int(hierarchy.n_species),
                         permuted=str(tr.params["permuted"])))
        rows.append(dict(statistic=f"normalised RF of the recovered tree ({tree_method})", value=srow["nrf"],
                         p_value=srow["nrf_p"], chance=srow["nrf_null"], n=int(hierarchy.n_species),
                         permuted=str(tr.params["permuted"])))
    keep = truth >= 0
    codes = hierarchy.species_ancestors[truth[keep]]
    present = [r for r in ranks if r in aligned]
    alignment = image_text_alignment(
        np.asarray(data.X)[keep], {r: codes[:, ranks.index(r)] for r in present}, {r: aligned[r] for r in present},
        parents={r: hierarchy.parent[r] for r in present}, species=truth[keep], bootstrap=bootstrap,
        permutations=permutations, seed=seed)
    return {"text_tree": pd.DataFrame(rows, columns=["statistic", "value", "p_value", "chance", "n", "permuted"]),
            "alignment": alignment}
