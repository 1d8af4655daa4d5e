"""Compare two report.json files number by number (the design issue's "numbers do not change" check).

    python benchmarks/compare_reports.py OLD/report.json NEW/report.json

Ignores what legitimately differs between runs: timings, package versions, the command line, the
cache-hit flag and extraction time. Prints every other difference and exits 1 if there is one.
"""

import json
import sys

IGNORED = {"timings", "versions", "command", "extraction_seconds", "cache_hit"}


def diff(a, b, path=""):
    """Yield (path, a, b) for every leaf that differs, skipping IGNORED keys."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k in IGNORED:
                continue
            if k not in a or k not in b:
                yield f"{path}/{k}", a.get(k, "<absent>"), b.get(k, "<absent>")
            else:
                yield from diff(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            yield from diff(x, y, f"{path}[{i}]")
    elif a != b:
        yield path, a, b


def main(argv=None) -> int:
    old, new = (json.load(open(p)) for p in (argv or sys.argv[1:])[:2])
    rows = list(diff(old, new))
    for path, a, b in rows:
        print(f"{path}: {str(a)[:120]}  ->  {str(b)[:120]}")
    print(f"{len(rows)} difference(s)")
    return 1 if rows else 0


if __name__ == "__main__":
    sys.exit(main())
