"""Where the tests find the real data: ``../shared/data`` beside the repository (read-only in CI).

Override with ``TREEPROBE_SHARED_DATA``.
"""

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("TREEPROBE_SHARED_DATA", REPO.parent / "shared" / "data"))
