"""Small shared helpers: the one copy of each (ranks, CPU count, numba switch, atomic writes,
error text, row normalisation) and the named constants that more than one module uses.

Nothing here knows about taxonomy or statistics; every module may import it.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable, BinaryIO, Iterator

import numpy as np

from treeprobe._validation import check_embeddings
from treeprobe.errors import TreeprobeError

__all__ = [
    "RANKS", "IMAGE_EXTENSIONS", "DEFAULT_MAX_MAP_POINTS", "MANTEL_FIGURE_PAIRS", "SINGLE_THREAD_MAX_ITEMS",
    "NO_NUMBA_ENV", "SEED_BOUND", "SEED_MAX", "ROW_CHUNK", "available_cpus", "numba_enabled", "one_line", "atomic_write",
    "atomic_write_text", "row_norms", "l2_normalise", "default_cache_dir", "OUTPUT_MIN_FREE_BYTES",
    "OUTPUT_BYTES_PER_ITEM", "REPORT_MARKERS", "check_output_dir", "check_output_file", "check_work_dir", "atomic_output_dir",
    "rebase_paths",
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
#: Largest seed a user may pass: every library treeprobe seeds takes it (scikit-learn's random_state
#: and numpy's RandomState are unsigned 32-bit; numpy's default_rng refuses negative seeds).
SEED_MAX = 2**32 - 1
#: Free space (bytes) an output folder must have before a run starts: 50 MiB covers the figures, the
#: Markdown/HTML pages and the JSON of a report; :data:`OUTPUT_BYTES_PER_ITEM` per item is added
#: where the item count is known (items.csv, one row per item).
OUTPUT_MIN_FREE_BYTES = 50 * 2**20
#: Bytes per analysed item a report folder takes beyond the fixed part (items.csv: path, 7 ranks, map
#: coordinates; about 250 B measured on the bundled example, rounded up).
OUTPUT_BYTES_PER_ITEM = 400
#: Files that mark a folder as a treeprobe output, which a new run may replace as a whole: the report
#: JSONs (checked to start with a ``treeprobe_..._version`` key) and the training-curves table.
REPORT_MARKERS = ("report.json", "compare.json", "training_curves.csv")
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


# --- output folders: checked before a run, written atomically ----------------------------------


def _mib(n: float) -> str:
    return f"{n / 2**20:,.0f} MB"


def _is_treeprobe_output(folder: Path) -> bool:
    """Whether ``folder`` holds one of :data:`REPORT_MARKERS` (a JSON one starting with a
    ``"treeprobe_..._version"`` key, as :func:`treeprobe.report.write_report` writes it)."""
    for name in REPORT_MARKERS:
        f = folder / name
        if not f.is_file():
            continue
        if not name.endswith(".json"):
            return True
        try:
            with open(f, "rb") as fh:
                head = fh.read(4096)
        except OSError:
            continue
        if re.match(rb'\s*\{\s*"treeprobe_\w*version"', head):
            return True
    return False


def _nearest_existing(path: Path) -> Path:
    """``path`` or its closest ancestor that exists (``/`` at worst)."""
    while not (path.exists() or path.is_symlink()) and path != path.parent:
        path = path.parent
    return path


def _probe_writable(folder: Path, name: str) -> None:
    """Create and remove an empty folder ``.NAME.probe-<pid>`` in ``folder``; raises OSError if that fails."""
    probe = folder / f".{name}.probe-{os.getpid()}"
    if probe.is_dir():
        os.rmdir(probe)
    os.mkdir(probe)
    os.rmdir(probe)


def _check_space(folder: Path, need_bytes: int, what: str, path) -> None:
    try:
        free = shutil.disk_usage(folder).free
    except OSError:  # pragma: no cover - a filesystem without statvfs: nothing to check against
        return
    if free < need_bytes:
        raise TreeprobeError(f"{what} {path}: only {_mib(free)} free on {folder}, the output needs at least "
                             f"{_mib(need_bytes)}; free some space or pass a folder on another disk")


def _check_parent(p: Path, what: str, path, need_bytes: int) -> Path:
    """The closest existing ancestor of ``p.parent``, checked: a folder, writable, with free space."""
    anc = _nearest_existing(p.parent)
    if not anc.is_dir():
        raise TreeprobeError(f"{what} {path}: {anc} is a file, so the folder cannot be created there; "
                             "pass a path whose parent is a folder")
    try:
        _probe_writable(anc, p.name or "out")
    except OSError as exc:
        raise TreeprobeError(f"{what} {path}: cannot write into {anc} ({exc.strerror or one_line(exc)}); "
                             "pass a folder you can write to") from None
    _check_space(anc, need_bytes, what, path)
    return anc


def check_output_dir(path: str | os.PathLike, *, what: str = "--out",
                     need_bytes: int = OUTPUT_MIN_FREE_BYTES) -> Path:
    """Check, before any long work, that a report folder can be written at ``path``; returns it absolute.

    Raises :class:`~treeprobe.errors.TreeprobeError` (one line, naming ``what``) when ``path`` is an
    existing file; is the current folder or one above it; is a non-empty folder that is not a treeprobe
    output (:data:`REPORT_MARKERS`: a new report replaces the folder as a whole, so no other folder is
    ever emptied); or when its closest existing ancestor is a file, is not writable (an empty folder
    is created and removed there) or has less than ``need_bytes`` free (:func:`shutil.disk_usage`).
    Nothing is left behind. A link to a folder is followed (the report replaces the folder it names).
    """
    p = Path(os.path.abspath(os.fspath(path)))
    if p.is_symlink() and p.is_dir():
        p = p.resolve()
    if (p.exists() or p.is_symlink()) and not p.is_dir():
        raise TreeprobeError(f"{what} {path} is an existing file, not a folder; pass a folder name "
                             "(it is created)")
    try:
        cwd = Path.cwd().resolve()
    except OSError:  # pragma: no cover - the current folder was removed
        cwd = None
    if cwd is not None and (p.resolve() == cwd or p.resolve() in cwd.parents):
        raise TreeprobeError(f"{what} {path} is the current folder or one above it; a report replaces its "
                             "folder as a whole: pass a new subfolder, e.g. treeprobe_out")
    if p.is_dir():
        try:
            entries = next(os.scandir(p), None) is not None
        except OSError as exc:
            raise TreeprobeError(f"{what} {path}: cannot read the folder ({one_line(exc)})") from None
        if entries and not _is_treeprobe_output(p):
            raise TreeprobeError(f"{what} {path} is a folder that is not empty and holds no treeprobe report "
                                 f"({' / '.join(REPORT_MARKERS)}); a report replaces its folder as a whole: "
                                 "pass a new or empty folder, or an earlier report's folder")
    _check_parent(p, what, path, need_bytes)
    return p


def check_output_file(path: str | os.PathLike, *, what: str = "--out", need_bytes: int = 2**20) -> Path:
    """Check, before any long work, that a file can be written at ``path`` (not a folder; its closest
    existing ancestor a writable folder with ``need_bytes`` free); returns it absolute."""
    p = Path(os.path.abspath(os.fspath(path)))
    if p.is_dir():
        raise TreeprobeError(f"{what} {path} is a folder; pass a file name")
    _check_parent(p, what, path, need_bytes)
    return p


def check_work_dir(path: str | os.PathLike, *, what: str = "--out",
                   need_bytes: int = OUTPUT_MIN_FREE_BYTES) -> Path:
    """Check, before any long work, a folder that a command fills in place (a training run, shards, an
    embedding cache: unlike a report, it is not replaced as a whole, so it may hold files); returns it
    absolute. Raises :class:`~treeprobe.errors.TreeprobeError` (one line, naming ``what``) when ``path``
    is an existing file, or when the folder (or its closest existing ancestor) is not a folder, not
    writable, or has less than ``need_bytes`` free. Nothing is created or left behind.
    """
    p = Path(os.path.abspath(os.fspath(path)))
    if (p.exists() or p.is_symlink()) and not p.is_dir():
        raise TreeprobeError(f"{what} {path} is an existing file, not a folder; pass a folder name "
                             "(it is created)")
    if not p.is_dir():
        _check_parent(p, what, path, need_bytes)
        return p
    try:
        _probe_writable(p, "out")
    except OSError as exc:
        raise TreeprobeError(f"{what} {path}: cannot write into the folder ({exc.strerror or one_line(exc)}); "
                             "pass a folder you can write to") from None
    _check_space(p, need_bytes, what, path)
    return p


_STALE = re.compile(r"(tmp|old|probe)-(\d+)")


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs (ours counts as gone: what it left is from a call that did not finish)."""
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # OverflowError: above any pid
        return False
    except OSError:  # PermissionError: another user's live process
        return True
    return True


def _clear_stale(final: Path) -> None:
    """Remove ``.NAME.tmp-<pid>`` / ``.NAME.probe-<pid>`` beside ``final`` left by runs that were killed
    (their process is gone); a ``.NAME.old-<pid>`` (a killed run's previous report, moved aside) is
    renamed back to ``final`` when ``final`` is missing, else removed."""
    prefix = f".{final.name}."
    try:
        entries = [e for e in os.scandir(final.parent) if e.name.startswith(prefix)]
    except OSError:
        return
    for e in sorted(entries, key=lambda e: e.name):
        m = _STALE.fullmatch(e.name[len(prefix):])
        if not m or _pid_alive(int(m.group(2))):
            continue
        path = Path(e.path)
        try:
            if m.group(1) == "old" and not (final.exists() or final.is_symlink()):
                os.rename(path, final)
            else:
                shutil.rmtree(path)
        except OSError:
            pass


def _swap_into_place(tmp: Path, final: Path) -> None:
    """Rename folder ``tmp`` to ``final``: an existing ``final`` is first renamed to ``.NAME.old-<pid>``
    and removed only once ``tmp`` is in place (renamed back if that fails)."""
    old = None
    if final.exists() or final.is_symlink():
        if not final.is_dir() or final.is_symlink():
            raise TreeprobeError(f"{final} was replaced by a file while the report was written; "
                                 "the new report was not kept")
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        if old.exists():
            shutil.rmtree(old)
        os.rename(final, old)
    try:
        os.rename(tmp, final)
    except BaseException:
        if old is not None:
            os.rename(old, final)
        raise
    _fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_output_dir(path: str | os.PathLike, *, what: str = "--out",
                      need_bytes: int = OUTPUT_MIN_FREE_BYTES) -> Iterator[Path]:
    """Write a whole folder atomically: readers see the old folder or the complete new one, never a mix.

    Checks ``path`` (:func:`check_output_dir`), removes what killed runs left beside it, and yields an
    empty temporary folder ``.NAME.tmp-<pid>`` in the same parent (one filesystem, so renames are
    atomic). When the block ends normally the temporary folder replaces ``path`` (an existing folder is
    moved aside, then removed once the new one is in place); when it raises (KeyboardInterrupt
    included) the temporary folder is removed and ``path`` is left as it was. An ``OSError`` while
    writing (a full disk, ENOSPC) becomes a one-line :class:`~treeprobe.errors.TreeprobeError`.

    >>> import tempfile
    >>> root = Path(tempfile.mkdtemp())
    >>> with atomic_output_dir(root / "rep") as tmp:
    ...     _ = (tmp / "report.json").write_text('{"treeprobe_report_version": 1}')
    >>> sorted(p.name for p in root.iterdir()), (root / "rep" / "report.json").exists()
    (['rep'], True)
    """
    final = check_output_dir(path, what=what, need_bytes=need_bytes)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TreeprobeError(f"{what} {path}: cannot create {final.parent} ({one_line(exc)})") from None
    _clear_stale(final)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    try:
        tmp.mkdir()
        yield tmp
        _swap_into_place(tmp, final)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            kept = "the previous report is unchanged" if final.exists() else "nothing was written"
            raise TreeprobeError(f"could not write {what} {path}: {one_line(exc).replace(str(tmp), str(final))}; "
                                 f"{kept}") from exc
        raise


def rebase_paths(paths: dict[str, str], src: str | os.PathLike, dst: str | os.PathLike) -> dict[str, str]:
    """``paths`` (name → path under folder ``src``) with ``src`` replaced by ``dst``.

    >>> rebase_paths({"json": "/t/.o.tmp-1/report.json"}, "/t/.o.tmp-1", "o")
    {'json': 'o/report.json'}
    """
    src = os.path.abspath(os.fspath(src))
    return {k: os.path.join(os.fspath(dst), os.path.relpath(os.path.abspath(v), src)) for k, v in paths.items()}
