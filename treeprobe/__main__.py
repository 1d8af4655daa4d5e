"""``python -m treeprobe ...`` (and ``torchrun -m treeprobe train|extract ...``): the ``treeprobe`` CLI."""

import sys

if __name__ == "__main__":
    from treeprobe.cli import main

    sys.exit(main())
