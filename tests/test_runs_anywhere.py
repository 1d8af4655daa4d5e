"""The README's main command, run as written from a copy of the repository with no ../shared beside it,
by a regular (non-editable) install of that copy: what a user who clones the repository gets."""

import json
import os
import re
import shlex
import site
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# The default image-level test (between-species pairs, species permuted) on the bundled embeddings:
# np.corrcoef over the 406,263 between-leaf pairs of the explicit 902 x 902 cosine and tree distance
# matrices gives 0.13309978841204365 (the exact clade-sum form agrees to 3e-15).
DEFAULT_IMAGE_PEARSON_R = 0.13309978841204653


def _readme_main_command() -> str:
    block = re.search(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S).group(1)
    first = block.strip().splitlines()[0]
    steps = [s.strip() for s in first.split("&&")]
    (run,) = [s for s in steps if "treeprobe intrinsic" in s]
    return run


def _copy_repository(dst: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = REPO / rel
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            (dst / rel).write_bytes(src.read_bytes())


@pytest.mark.timeout(900)
def test_readme_main_command_from_a_bare_copy(tmp_path):
    cmd = _readme_main_command()
    assert cmd.startswith(".venv/bin/treeprobe intrinsic") and "../shared" not in cmd
    repo, venv = tmp_path / "clone" / "treeprobe", tmp_path / "clone" / "treeprobe" / ".venv"
    _copy_repository(repo)
    assert not (repo.parent / "shared").exists() and not (repo.parent.parent / "shared").exists()
    # a fresh venv; the heavy dependencies (torch, ...) come from this test run's environment through a
    # .pth line, treeprobe itself is built and installed from the copy (no editable link back here)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    sp = next((venv / "lib").glob("python*/site-packages"))
    (sp / "_deps_of_the_test_run.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels),
                    str(repo)], check=True, cwd=repo)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--no-deps", *map(str, wheels.glob("*.whl"))],
                   check=True, cwd=repo)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TREEPROBE")}
    env.update(HOME=str(tmp_path / "home"), TREEPROBE_CACHE=str(tmp_path / "cache"), MPLBACKEND="Agg",
               PYTHONPATH="")
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import treeprobe; print(treeprobe.__file__)"],
                           check=True, capture_output=True, text=True, cwd=tmp_path, env=env).stdout.strip()
    assert where.startswith(str(sp)), where  # the installed copy, not this checkout
    res = subprocess.run(shlex.split(cmd), cwd=repo, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    out = repo / "out" / "bioclip2"
    rep = json.loads((out / "report.json").read_text())
    assert rep["provenance"]["n_items"] == 902 and rep["skipped"]["count"] == 128
    img = {m["method"]: m for m in rep["mantel"] if m["level"] == "image"}
    assert img["pearson"]["statistic"] == pytest.approx(DEFAULT_IMAGE_PEARSON_R, abs=1e-13)
    assert img["pearson"]["n_pairs"] == 406_263 and img["pearson"]["scheme"] == "species"
    assert img["pearson"]["p_value"] == pytest.approx(1 / 1000)
    for fig in ("tsne_by_rank", "umap_by_rank", "rank_metrics", "mantel_distances"):
        assert (out / "figures" / f"{fig}.png").stat().st_size > 10_000, fig
    assert "items analysed: 902" in res.stdout
