# Shared pytest fixtures. Each contributor keeps their fixtures inside their own marked section.

# ============================================================================
# BEGIN section: data / models / extract (treeprobe/data.py, models.py, extract.py)
# ============================================================================
import os as _os

_os.environ["HF_HUB_OFFLINE"] = "1"  # no hub access in tests: hub ids must fail fast and cleanly

import pytest as _pytest

# A tiny open_clip architecture (32-d embeddings, 32-px images): builds and runs in milliseconds.
TINY_CLIP_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 1000, "width": 32, "heads": 2, "layers": 1},
}


@_pytest.fixture(scope="session")
def tiny_clip_cfg():
    """A deep copy of the tiny open_clip config dict (embed_dim 32, image_size 32)."""
    import copy

    return copy.deepcopy(TINY_CLIP_CFG)


@_pytest.fixture(scope="session")
def tiny_clip_checkpoint(tmp_path_factory):
    """Path of an open_clip-trainer-style checkpoint (``module.`` keys + model_cfg) of a
    randomly initialised tiny CLIP, and its plain state dict: (path, state_dict)."""
    import open_clip
    import torch

    with torch.random.fork_rng(devices=[]):  # leave the global RNG as other tests expect it
        torch.manual_seed(123)
        model = open_clip.CLIP(**TINY_CLIP_CFG)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    path = tmp_path_factory.mktemp("tiny_ckpt") / "epoch_1.pt"
    torch.save(
        {"epoch": 1, "state_dict": {f"module.{k}": v for k, v in sd.items()},
         "model_cfg": TINY_CLIP_CFG, "model_name": "tiny-test-clip"},
        path,
    )
    return str(path), sd


# ============================================================================
# END section: data / models / extract
# ============================================================================


# ============================================================================
# BEGIN section: shared by the numeric tests (clustering, neighbours)
# ============================================================================
@_pytest.fixture
def one_blas_thread():
    """Single-threaded BLAS/OpenMP: faster at these sizes and robust on a busy 2-core box."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        yield
