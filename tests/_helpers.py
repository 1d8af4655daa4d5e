"""Small helpers shared by several test modules (one copy of each)."""

from pathlib import Path


def spy_mantel_permutations(monkeypatch) -> list:
    """Record the permuted statistics of every ``treeprobe.mantel._run_permutations`` call (a copy of each
    returned array, in call order); the function itself still runs."""
    import treeprobe.mantel as MM

    calls = []
    orig = MM._run_permutations

    def spy(*args, **kwargs):
        out = orig(*args, **kwargs)
        calls.append(out.copy())
        return out

    monkeypatch.setattr(MM, "_run_permutations", spy)
    return calls


def rendered_image_csv(folder: Path) -> Path:
    """metadata.csv of 16 rendered images (32 px) of 16 species of a small simulated world, in ``folder``."""
    from treeprobe.simulate import simulate_world
    from treeprobe.synthetic_images import write_image_folder

    world = simulate_world(n_kingdoms=2, branching=[1, 1, 1, 2, 2, 2], images_per_species=1, seed=0)
    write_image_folder(world, folder, image_size=32)
    return folder / "metadata.csv"
