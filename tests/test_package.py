"""Package structure: one package, lazy submodules, documented public names, keyword-only options,
doctests that run, and the README's Python example run as written."""

import doctest
import importlib
import inspect
import os
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest

import treeprobe

REPO = Path(__file__).resolve().parents[1]
MAX_POSITIONAL = 3


def _modules():
    """Every module of treeprobe and treeprobe.training (not the numba kernels' private modules)."""
    names = ["treeprobe"]
    for pkg in (treeprobe, importlib.import_module("treeprobe.training")):
        names += [m.name for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + ".")]
    return [n for n in names if not n.endswith("__main__")]


def _public_modules():
    """The modules users import: no component starting with an underscore."""
    return [n for n in _modules() if not any(part.startswith("_") for part in n.split("."))]


def _public_callables(mod):
    """(qualified name, object) for public functions and public methods of public classes defined in mod."""
    out = []
    for name, obj in vars(mod).items():
        if name.startswith("_") or getattr(obj, "__module__", None) != mod.__name__:
            continue
        if inspect.isfunction(obj):
            out.append((f"{mod.__name__}.{name}", obj))
        elif inspect.isclass(obj):
            out.append((f"{mod.__name__}.{name}", obj))
            for mname, m in vars(obj).items():
                if not mname.startswith("_") and inspect.isfunction(m):
                    out.append((f"{mod.__name__}.{name}.{mname}", m))
    return out


def test_submodules_are_lazy_and_no_function_hides_a_module():
    code = ("import sys, treeprobe as tp; assert 'treeprobe.pl' not in sys.modules; "
            "assert callable(tp.pl.tsne) and callable(tp.tl.mantel) and callable(tp.datasets.bioclip2_1k); "
            "import types; assert all(isinstance(getattr(tp, n), types.ModuleType) for n in tp.SUBMODULES)")
    subprocess.run([sys.executable, "-c", code], check=True, cwd="/")


def test_no_generic_top_level_module_is_installed():
    """`training/` installs as treeprobe.training: from outside the repository, `import training` fails."""
    code = "import importlib.util as u; assert u.find_spec('training') is None; import treeprobe.training.cli"
    subprocess.run([sys.executable, "-c", code], check=True, cwd="/")


@pytest.mark.parametrize("modname", _public_modules())
def test_public_names_documented_and_options_keyword_only(modname):
    mod = importlib.import_module(modname)
    assert mod.__doc__, f"{modname} has no module docstring"
    exported = getattr(mod, "__all__", None)
    assert exported is not None, f"{modname} has no __all__"
    for name in exported:
        assert hasattr(mod, name), f"{modname}.__all__ names {name!r}, which does not exist"
    for qual, obj in _public_callables(mod):
        assert inspect.getdoc(obj), f"{qual} has no docstring"
        if inspect.isclass(obj):
            continue
        params = [p for p in inspect.signature(obj).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name not in ("self", "cls")]
        assert len(params) <= MAX_POSITIONAL, (
            f"{qual} takes {len(params)} positional parameters ({', '.join(p.name for p in params)}); "
            f"make those past the first {MAX_POSITIONAL} keyword-only")


def test_doctests_run():
    flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    attempted = 0
    for modname in _modules():
        res = doctest.testmod(importlib.import_module(modname), optionflags=flags, verbose=False)
        assert res.failed == 0, f"doctest failures in {modname}"
        attempted += res.attempted
    assert attempted >= 20  # the examples exist (a module losing them all would go unnoticed otherwise)


def _python_blocks(text):
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_python_example_runs_as_written(tmp_path, monkeypatch):
    """The README's Python example, run as written (it uses only the bundled example)."""
    blocks = _python_blocks((REPO / "README.md").read_text())
    assert blocks, "README has no ```python example"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    scope: dict = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), scope)  # noqa: S102 - our own documentation
    assert (tmp_path / "out" / "report.json").exists()


def test_every_readme_and_contracts_name_exists():
    """Dotted API names in README.md and docs/CONTRACTS.md (``tp.x.y`` / ``treeprobe.x.y``) resolve."""
    text = (REPO / "README.md").read_text() + (REPO / "docs" / "CONTRACTS.md").read_text()
    names = set(re.findall(r"`(?:tp|treeprobe)\.([A-Za-z_][\w.]*)", text))
    assert len(names) > 10
    for name in sorted(names):
        obj = treeprobe
        for part in name.split("."):
            obj = getattr(obj, part, None)
            assert obj is not None, f"treeprobe.{name} named in the docs does not exist"
