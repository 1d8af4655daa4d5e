"""treeprobe.training is a subpackage of treeprobe; nothing installs a top-level `training`."""

import subprocess
import sys


def test_only_treeprobe_training_is_importable(tmp_path):
    # run outside the repository, so the checkout's training/ folder is not on sys.path by accident
    code = ("import importlib.util, treeprobe.training.cli as c; "
            "print(importlib.util.find_spec('training') is None, callable(c.add_subcommands))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["True", "True"]
