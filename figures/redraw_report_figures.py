"""Redraw every figure of a treeprobe report from its folder (report.json, items.csv, mantel_pairs.npz).

    python figures/redraw_report_figures.py out/bioclip2 [--out out/bioclip2/figures_redrawn]

The numbers are not recomputed: the figures come from what the report stored, so a paper figure can be
restyled and regenerated without rerunning the analysis.
"""

import argparse
import sys

from treeprobe.errors import TreeprobeError
from treeprobe.report import write_figures, load_report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("report_dir", help="folder written by `treeprobe intrinsic --out`")
    p.add_argument("--out", help="where to write the figures (default REPORT_DIR/figures)")
    args = p.parse_args(argv)
    try:
        report = load_report(args.report_dir)
    except TreeprobeError as exc:
        print(f"treeprobe: error: {exc}", file=sys.stderr)
        return 2
    from pathlib import Path

    written = write_figures(report, Path(args.out or Path(args.report_dir) / "figures"))
    for name, path in written.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
