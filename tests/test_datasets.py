"""treeprobe.datasets: the bundled real example is the released file, with its licence; generated sets."""

import hashlib

import numpy as np
import pytest

from tests._paths import TOL_EMBEDDINGS
from treeprobe import datasets


def test_bundled_example_is_the_released_file_byte_for_byte():
    shared = TOL_EMBEDDINGS / "example_1k.parquet"
    if not shared.exists():
        pytest.skip("../shared/data not beside the repository")
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    assert digest(datasets.BIOCLIP2_1K) == digest(shared)


def test_bundled_example_has_licence_and_attribution():
    folder = datasets.BIOCLIP2_1K.parent
    assert "Copyright (c) 2025 Imageomics Institute" in (folder / "LICENSE").read_text()
    assert "Permission is hereby granted, free of charge" in (folder / "LICENSE").read_text()
    assert "Imageomics/emb-explorer" in (folder / "README.md").read_text()


def test_bioclip2_1k_contents():
    ds = datasets.bioclip2_1k()
    assert ds.X.dtype == np.float32 and ds.X.shape == (902, 768)
    assert ds.taxonomy.n_taxa("kingdom") == 4 and ds.source == "bioclip2-1k"
    assert ds.items.img_type.value_counts()["Citizen Science"] == 663
    norms = np.linalg.norm(ds.X, axis=1)
    assert 30 < norms.min() and 45 < np.median(norms) < 57  # as released: not normalised


def test_simulated_world_and_its_images(tmp_path):
    ds = datasets.simulated_world(seed=1, n_kingdoms=2)
    world = ds.uns["world"]
    np.testing.assert_array_equal(ds.X, world.embeddings.astype(np.float32))
    assert len(ds) == world.n_items
    imgs = datasets.synthetic_images(seed=0, folder=tmp_path / "w")
    assert imgs.X is None and (tmp_path / "w" / "metadata.csv").exists()
    assert all(p.endswith(".png") for p in imgs.items.path)
