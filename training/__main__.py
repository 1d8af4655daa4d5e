"""``python -m treeprobe.training`` (also what ``torchrun -m treeprobe.training`` runs)."""

import sys

from treeprobe.training.cli import main

__all__: list[str] = []

sys.exit(main())
