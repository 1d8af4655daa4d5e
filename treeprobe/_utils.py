"""Small shared helpers: the one copy of each (ranks, CPU count, numba switch, atomic writes,
error text, row normalisation) and the named constants that more than one module uses.

Nothing here knows about taxonomy or statistics; every module may import it.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, BinaryIO

import numpy as np

from treeprobe._validation import check_embeddings
from treeprobe.errors import TreeprobeError

__all__ = [
    "RANKS", "IMAGE_EXTENSIONS", "DEFAULT_MAX_MAP_POINTS", "MANTEL_FIGURE_PAIRS", "SINGLE_THREAD_MAX_ITEMS",
    "NO_NUMBA_ENV", "SEED_BOUND", "ROW_CHUNK", "available_cpus", "numba_enabled", "one_line", "atomic_write",
    "atomic_write_text", "row_norms", "l2_normalise", "default_cache_dir",
]

#: The seven Linnaean ranks treeprobe works with, top first; ``species`` holds the binomial.
RANKS: tuple[str, ...] = ("kingdom", "phylum", "class", "order", "family", "genus", "species")

#: File name endings read as images (lower case; matched case-insensitively).
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")

#: Above this many items the 2-D maps are drawn on a seeded random subsample of this size.
DEFAULT_MAX_MAP_POINTS = 20_000
#: Item pairs drawn (seeded) for the "embedding distance by tree distance" figure.
MANTEL_FIGURE_PAIRS = 20_000
#: At or below this many items k-means runs on one thread (threads oversubscribe small problems:
#: measured 5-10x slower with 2 threads below ~1e4 items).
SINGLE_THREAD_MAX_ITEMS = 20_000
#: Environment variable that turns every numba kernel off (numpy fallbacks give the same numbers).
NO_NUMBA_ENV = "TREEPROBE_NO_NUMBA"
#: Exclusive upper bound of the integer seeds drawn from a seeded stream for a sub-step
#: (``rng.integers(SEED_BOUND)``): 2**31 fits every library's seed type (a signed 32-bit int).
SEED_BOUND = 2**31
#: Rows per chunk in the row-wise passes of :func:`row_norms`: 65,536 x 512 float32 = 128 MB
#: per temporary, small next to the array, large enough that the per-chunk overhead is nil.
ROW_CHUNK = 1 << 16


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask on Linux), at least 1.

    >>> available_cpus() >= 1
    True
    """
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:  # pragma: no cover - not Linux
        return max(os.cpu_count() or 1, 1)


def numba_enabled() -> bool:
    """Whether the numba kernels (Mantel permutations, kNN block scans) may be used.

    False when the environment variable ``TREEPROBE_NO_NUMBA`` is set to anything but '' or
    '0'; read at each call, so setting it mid-session switches every kernel to its numpy
    fallback (same numbers, more slowly).
    """
    return os.environ.get(NO_NUMBA_ENV, "") in ("", "0")


def one_line(exc: BaseException, limit: int = 300) -> str:
    """An exception as one line of at most ``limit`` characters, with its type when the message is bare.

    >>> one_line(KeyError(101))
    'KeyError: 101'
    >>> one_line(ValueError("a long message\\nover two lines"))
    'a long message over two lines'
    """
    msg = " ".join(str(exc).split())
    if len(msg) < 20:  # bare messages like KeyError(101) say nothing without their type
        msg = f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None], *, fsync: bool = True) -> Path:
    """Write a file so that readers see the old file or the whole new one, never a part.

    ``write(f)`` fills a temporary file (binary mode) in the same folder, which is then
    ``os.replace``'d onto ``path``; on any exception (KeyboardInterrupt included) the temporary
    file is removed and ``path`` is untouched. Parent folders are created. Returns ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the usual permissions
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    if fsync:
        _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str, *, fsync: bool = True) -> Path:
    """:func:`atomic_write` of a UTF-8 text."""
    data = text.encode("utf-8")
    return atomic_write(path, lambda f: f.write(data), fsync=fsync)


def row_norms(X, chunk: int = ROW_CHUNK) -> tuple[np.ndarray, np.ndarray]:
    """``(finite, norms)`` of the rows of ``X`` (N, D): bool (N,), whether every value of a row
    is finite, and (N,) its L2 norm (``np.linalg.norm``'s values, float32 for float32 input;
    0 where not finite), computed in chunks of ``chunk`` rows so no N x D temporary is made
    (2 GB at 1M x 512 float32).

    >>> finite, norms = row_norms(np.array([[3.0, 4.0], [np.nan, 1.0]]))
    >>> finite.tolist(), norms.tolist()
    ([True, False], [5.0, 0.0])
    """
    X = np.asarray(X)
    finite = np.empty(X.shape[0], dtype=bool)
    norms = np.zeros(X.shape[0], dtype=np.result_type(X.dtype, np.float32))
    for a in range(0, X.shape[0], chunk):
        block = X[a:a + chunk]
        ok = np.isfinite(block).all(axis=1)
        finite[a:a + chunk] = ok
        norms[a:a + chunk][ok] = np.linalg.norm(block[ok], axis=1)
    return finite, norms


def l2_normalise(X, dtype=None) -> np.ndarray:
    """Return ``X / ||X||`` row-wise as a new float array, shape (N, D).

    Float32 input stays float32 (other input becomes float64 unless ``dtype`` is given).
    Raises :class:`~treeprobe.errors.TreeprobeError` for a non-2-D array, non-finite values
    or a zero row (cosine geometry is undefined for a zero vector).

    >>> l2_normalise([[3.0, 4.0], [0.0, 2.0]])
    array([[0.6, 0.8],
           [0. , 1. ]])
    """
    X = check_embeddings(X)
    if dtype is None:
        dtype = np.float32 if X.dtype == np.float32 else np.float64
    X = X.astype(dtype, copy=True)
    finite, norms = row_norms(X)
    if not finite.all():
        raise TreeprobeError(f"embeddings contain NaN or infinite values ({int((~finite).sum())} rows)")
    zero = np.flatnonzero(norms == 0)
    if zero.size:
        raise TreeprobeError(
            f"{zero.size} embedding rows are all zeros (first: row {zero[0]}); "
            "cosine similarity is undefined for them"
        )
    X /= norms[:, None]
    return X


def default_cache_dir() -> Path:
    """Embedding cache folder: ``$TREEPROBE_CACHE``, else ``~/.cache/treeprobe``."""
    return Path(os.environ.get("TREEPROBE_CACHE", Path.home() / ".cache" / "treeprobe"))
