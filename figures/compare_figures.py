"""Draw the paper figures of a model comparison from its JSON file, without recomputing anything.

    python figures/compare_figures.py comparison.json [--out figures_out]

The JSON holds ``"per_model"`` (records: model, metric, rank, estimate, ci_low, ci_high, chance),
``"drilldown_tsne"`` (the records of ``treeprobe.drilldown.drilldown_tsne``) and
``"distance_profiles"`` (model -> the records of ``treeprobe.drilldown.distance_profile``).
Writes ``metric_panels``, ``drilldown_tsne`` and ``distance_profiles`` as PNG + PDF into ``--out``
(default: ``figures/`` beside the JSON file). A key that is absent or empty is reported and skipped.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

def figures_from_json(path, out) -> dict:
    """Read the comparison JSON at ``path`` and write its figures (PNG + PDF) into the folder ``out``
    with :func:`treeprobe.compare_report.write_compare_figures` (the same drawing as ``treeprobe compare``).

    Returns {figure name: (png path, pdf path)} for the figures written, in the order of
    ``treeprobe.compare_report.FIGURES``; names whose JSON key is absent or empty are left out (with a
    note on stderr).
    """
    from treeprobe.compare_report import FIGURES, write_compare_figures
    from treeprobe.errors import TreeprobeError

    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise TreeprobeError(f"cannot read the comparison JSON {path}: {exc}") from None
    if not isinstance(data, dict):
        raise TreeprobeError(f"{path}: expected a JSON object with keys {', '.join(k for k, _ in FIGURES.values())}")
    for name, (key, _title) in FIGURES.items():
        if not data.get(key):
            print(f"compare_figures: no {key!r} in {path}; {name} not drawn", file=sys.stderr)
    return write_compare_figures(data, out)


def main(argv=None) -> int:
    """Command line: ``compare_figures.py JSON [--out FOLDER]``; prints the files written."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("json", help="the comparison JSON (keys per_model, drilldown_tsne, distance_profiles)")
    p.add_argument("--out", help="folder for the figures (default: figures/ beside the JSON file)")
    args = p.parse_args(argv)
    from treeprobe.errors import TreeprobeError

    try:
        written = figures_from_json(args.json, args.out or Path(args.json).resolve().parent / "figures")
    except TreeprobeError as exc:
        print(f"compare_figures: error: {exc}", file=sys.stderr)
        return 2
    for name, paths in written.items():
        print(f"{name}: " + ", ".join(map(str, paths)))
    return 0 if written else 1


if __name__ == "__main__":
    sys.exit(main())
