"""How much of the clustering jackknife's standard error is k-means' own run-to-run noise.

    python analyses/clustering_jackknife_noise.py              # worlds 3 and 4 of same-model-small, seeds 0-5

For each world of ``same-model-small`` (analyses/null_calibration.py) the two models are compared with
``tl.compare`` under several seeds: the data stay fixed, the seed moves only the k-means starts and the
jackknife groups. Prints, per rank, the seed-to-seed sd of the k-means purity difference (the optimiser's
share alone) next to the mean jackknife se (NULL_CALIBRATION.md, run 7).
"""

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import null_calibration as nc  # noqa: E402
from treeprobe.compare import compare  # noqa: E402
from treeprobe.core import TreeData  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worlds", type=int, nargs="+", default=[3, 4])
    ap.add_argument("--seeds", type=int, default=6)
    args = ap.parse_args()
    for world in args.worlds:
        w = nc.WORLDS["same-model-small"].make(world)
        a = TreeData(w.X, w.items)
        b = TreeData(np.ascontiguousarray(w.obsm[nc.SECOND_MODEL], dtype=np.float32), w.items)
        diffs, ses = [], []
        for seed in range(args.seeds):
            comp = compare({"a": a, "b": b}, on="row", seed=seed, permutations=19, bootstrap=99, similarity=False,
                           distance_profiles=False, cluster_methods=("kmeans",), chance_permutations=2)
            d = comp.differences
            d = d[d.metric == "kmeans purity"].set_index("rank")
            diffs.append(d["difference"].to_numpy())
            ses.append(((d["ci_high"] - d["ci_low"]) / 3.92).to_numpy())
        print(f"world {world}, ranks {list(d.index)}")
        print("  sd of the difference over seeds:", np.round(np.std(diffs, axis=0, ddof=1), 4))
        print("  mean jackknife se:              ", np.round(np.mean(ses, axis=0), 4))


if __name__ == "__main__":
    main()
