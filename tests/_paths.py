"""Where the tests find the real data: ``../shared/data`` beside the repository (read-only in CI).

Override with ``TREEPROBE_SHARED_DATA``.
"""

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("TREEPROBE_SHARED_DATA", REPO.parent / "shared" / "data"))
TOL_EMBEDDINGS = SHARED_DATA / "tol200m_bioclip2_embeddings_1k"


def real_tol_embeddings():
    """The real BioCLIP-2 embeddings with a kingdom (909 of 1,030 rows) and their codes per rank.

    Returns (X float32 (909, 768), {rank: int codes (909,)}) with codes of cumulative labels
    ('' = placeholder under its parent). Skips the calling test when the data is absent.
    """
    import numpy as np
    import pandas as pd
    import pytest

    if not (TOL_EMBEDDINGS / "embeddings.npy").exists():
        pytest.skip("real tol200m embeddings not available")

    from treeprobe.taxonomy import RANKS

    df = pd.read_csv(TOL_EMBEDDINGS / "metadata.csv", keep_default_na=False, dtype=str)
    X = np.load(TOL_EMBEDDINGS / "embeddings.npy")
    keep = (df["kingdom"] != "").to_numpy()
    df = df[keep].reset_index(drop=True)
    codes = {r: pd.factorize(df[list(RANKS[: i + 1])].agg("|".join, axis=1))[0] for i, r in enumerate(RANKS)}
    return X[keep], codes
