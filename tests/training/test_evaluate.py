"""The in-training evaluation passes its light settings through to the analysis."""

import numpy as np
import pandas as pd

from treeprobe.training import evaluate as ev


def test_evaluate_passes_permutations_and_light_settings(monkeypatch):
    """Bug caught: the options were filtered against analyse_embeddings(**kwargs)'s own signature, so
    --eval-permutations, maps=() and progress=False never reached the analysis (999 permutations, maps
    and progress bars inside the training loop)."""
    import treeprobe.pipeline as pipeline

    seen = {}
    rng = np.random.default_rng(0)
    items = pd.DataFrame({"path": [f"img{i}.png" for i in range(12)], "kingdom": ["A"] * 6 + ["B"] * 6,
                          "phylum": ["p"] * 12, "class": ["c"] * 12, "order": ["o"] * 12, "family": ["f"] * 12,
                          "genus": ["g1", "g2"] * 6, "species": [f"s{i % 4}" for i in range(12)]})
    monkeypatch.setattr(ev, "embed_images", lambda *a, **k: rng.standard_normal((12, 8)).astype(np.float32))

    def fake(emb, its, **kwargs):
        seen.update(kwargs)
        raise RuntimeError("stop here")

    monkeypatch.setattr(pipeline, "analyse_embeddings", fake)
    res = ev.evaluate(None, items, None, permutations=7)
    assert seen["permutations"] == 7 and seen["maps"] == () and seen["progress"] is False
    assert seen["chance_permutations"] == ev.CHANCE_PERMUTATIONS
    assert "analyse_embeddings failed" in res["tp_note"] and res["eval_n"] == 12
