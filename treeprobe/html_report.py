"""Self-contained HTML reports: one file, no network, readable on screen and on paper.

The page is a single HTML5 file: the CSS and a short sort script are inline, figures are embedded
as ``data:`` URIs, and nothing is loaded from anywhere (no fonts, no CDN, no external link), so a
report can be mailed, archived or opened offline years later and look the same.

Primitives (each returns :class:`HTML`, a ``str`` that :func:`render_html` inserts as is):

- :func:`html_table` — a DataFrame as a ``<table class="sortable">``; numbers are shown to a few
  significant digits with the full value in ``data-value`` (so clicking a header sorts numerically);
- :func:`figure_html` — a PNG (or JPEG, GIF, WebP, SVG) embedded as a ``data:`` URI;
- :func:`render_html` — the page: title, table of contents, :class:`Section` s, inline CSS and JS.

Reports: :func:`intrinsic_html` renders an intrinsic :class:`~treeprobe.report.Report`,
:func:`compare_html` a comparison of several models; :func:`write_html` writes either atomically.

>>> page = render_html("Demo", [Section("Numbers", [html_table(pd.DataFrame({"x": [2.0, 1.0]}))])])
>>> page.startswith("<!DOCTYPE html>") and 'data-value="2.0"' in page and "http" not in page
True
"""

from __future__ import annotations

import base64
import html as _html
import json
import math
import numbers
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from treeprobe._utils import atomic_write_text
from treeprobe.errors import TreeprobeError

__all__ = ["HTML", "Section", "html_table", "figure_html", "render_html", "intrinsic_html", "compare_html",
           "write_html", "format_number"]

#: Shown for a missing value (NaN, None) in a table.
MISSING = "–"


class HTML(str):
    """A string that is already HTML: :func:`render_html` inserts it unescaped (a plain ``str`` block
    is paragraph text and is escaped).

    >>> isinstance(HTML("<b>x</b>"), str)
    True
    """

    __slots__ = ()


@dataclass
class Section:
    """One section of a page: an ``<h2>`` title and its blocks, in order.

    A block is :class:`HTML` (from :func:`html_table`, :func:`figure_html`, or your own markup),
    a :class:`pandas.DataFrame` (rendered with :func:`html_table`), or plain text: escaped, split into
    paragraphs at blank lines, lines starting with ``- `` become a list, and ``**bold**``,
    ``*italic*`` and ```code``` are honoured (the small subset of Markdown the reports use).
    """

    title: str
    blocks: list = field(default_factory=list)


# --- text and numbers ----------------------------------------------------------------------------


def _esc(text) -> str:
    """HTML-escape ``text`` (quotes included); ``//`` is written ``/&#47;`` (the same on screen) so that
    no text in a report (a data source, a command line) reads as a URL to a scanner or a linkifier.

    >>> _esc('<a href="https://x">')
    '&lt;a href=&quot;https:/&#47;x&quot;&gt;'
    """
    return _html.escape(str(text), quote=True).replace("//", "/&#47;")


def _is_missing(value) -> bool:
    if value is None or value is pd.NA or value is pd.NaT:
        return True
    return isinstance(value, (float, np.floating)) and math.isnan(value)


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def format_number(value, digits: int = 3) -> str:
    """``value`` to ``digits`` significant digits, as a table shows it (trailing zeros dropped;
    integers and integral values of ``digits`` or more digits in full; scientific below 1e-4).

    >>> [format_number(v) for v in (0.155873, 0.01, 44840, 298.0, 1234.6, 3.2e-7, 0.0, float("nan"))]
    ['0.156', '0.01', '44840', '298', '1235', '3.2e-07', '0', '–']
    """
    if _is_missing(value):
        return MISSING
    if isinstance(value, (numbers.Integral, np.integer)):
        return str(int(value))
    x = float(value)
    if math.isinf(x):
        return "∞" if x > 0 else "−∞"
    if x == 0:
        return "0"
    if abs(x) < 1e-4 or abs(x) >= 1e15:
        mantissa, exp = f"{x:.{max(digits - 1, 0)}e}".split("e")
        mantissa = mantissa.rstrip("0").rstrip(".") if "." in mantissa else mantissa
        return f"{mantissa}e{exp}"
    magnitude = math.floor(math.log10(abs(x)))
    text = f"{x:.{max(digits - 1 - magnitude, 0)}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def _sort_value(value) -> str:
    """The full value of a number for ``data-value`` (what the sort script compares)."""
    if _is_missing(value):
        return "NaN"
    if isinstance(value, (numbers.Integral, np.integer)):
        return str(int(value))
    return repr(float(value))


def _cell_text(value) -> str:
    if _is_missing(value):
        return MISSING
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, default=str, ensure_ascii=False)
    if isinstance(value, np.ndarray):
        return json.dumps(value.tolist(), default=str)
    return str(value)


def _numeric_column(series: pd.Series) -> bool:
    if pd.api.types.is_bool_dtype(series):
        return False
    if pd.api.types.is_numeric_dtype(series):
        return True
    present = [v for v in series if not _is_missing(v)]
    return bool(present) and all(_is_number(v) for v in present)


_INLINE = [(re.compile(r"`([^`]+)`"), r"<code>\1</code>"),
           (re.compile(r"\*\*(.+?)\*\*"), r"<strong>\1</strong>"),
           (re.compile(r"(?<![\w*])\*(?!\s)(.+?)(?<!\s)\*(?![\w*])"), r"<em>\1</em>")]


def _inline(text: str) -> str:
    out = _esc(text)
    for pattern, repl in _INLINE:
        out = pattern.sub(repl, out)
    return out


def _text_blocks(text: str) -> str:
    """Plain text → ``<p>`` and ``<ul>`` (see :class:`Section`)."""
    parts: list[str] = []
    for chunk in re.split(r"\n\s*\n", text.strip()):
        items: list[str] = []
        plain: list[str] = []
        for line in chunk.splitlines():
            if line.lstrip().startswith("- "):
                items.append(line.lstrip()[2:].strip())
            elif items and line[:1].isspace():
                items[-1] += " " + line.strip()
            else:
                plain.append(line.strip())
        if plain:
            parts.append(f"<p>{_inline(' '.join(plain))}</p>")
        if items:
            parts.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in items) + "</ul>")
    return "\n".join(parts)


# --- primitives ----------------------------------------------------------------------------------


def html_table(df: pd.DataFrame, *, caption: str | None = None, sortable: bool = True, digits: int = 3) -> HTML:
    """A DataFrame as an HTML ``<table>`` (its columns, not its index: ``reset_index()`` first to show it).

    Numbers are shown to ``digits`` significant digits (:func:`format_number`) and carry their full
    value in ``data-value``; a column whose values are all numbers gets ``data-type="num"`` on its
    header, so the page's script sorts it numerically (missing values last). NaN and None show as
    "–". Text is escaped. An empty frame gives a one-line "no rows" paragraph.

    >>> t = html_table(pd.DataFrame({"taxon": ["<b>", "Apis"], "r": [0.123456, float("nan")]}))
    >>> '<th scope="col" data-type="num"' in t, 'data-value="0.123456">0.123<' in t, "&lt;b&gt;" in t
    (True, True, True)
    """
    cap = f"<caption>{_esc(caption)}</caption>" if caption else ""
    if df is None or len(df.columns) == 0 or len(df) == 0:
        what = f"{_esc(caption)}: no rows." if caption else "No rows."
        return HTML(f'<p class="empty">{what}</p>')
    numeric = [_numeric_column(df[c]) for c in df.columns]
    head = []
    for col, num in zip(df.columns, numeric):
        label = _esc(col)
        attrs = ' data-type="num"' if num else ' data-type="text"'
        inner = f'<button type="button" class="sort">{label}</button>' if sortable else label
        head.append(f'<th scope="col"{attrs}>{inner}</th>')
    body = []
    for row in df.itertuples(index=False, name=None):
        cells = []
        for value, num in zip(row, numeric):
            if num or _is_number(value):
                cls = "num na" if _is_missing(value) else "num"
                cells.append(f'<td class="{cls}" data-value="{_sort_value(value)}">'
                             f"{_esc(format_number(value, digits))}</td>")
            elif _is_missing(value):
                cells.append(f'<td class="na">{MISSING}</td>')
            else:
                cells.append(f"<td>{_esc(_cell_text(value))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    cls = ' class="sortable"' if sortable else ""
    return HTML(f'<div class="table-wrap"><table{cls}>{cap}<thead><tr>{"".join(head)}</tr></thead>\n'
                f'<tbody>\n{chr(10).join(body)}\n</tbody></table></div>')


_MAGIC = [(b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"), (b"GIF8", "image/gif")]


def _mime(data: bytes) -> str:
    for magic, mime in _MAGIC:
        if data.startswith(magic):
            return mime
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    head = data[:512].lstrip().lower()
    if head.startswith(b"<svg") or (head.startswith(b"<?xml") and b"<svg" in data[:4096].lower()):
        return "image/svg+xml"
    raise TreeprobeError("not an image treeprobe can embed (PNG, JPEG, GIF, WebP or SVG expected)")


def figure_html(png_path_or_bytes, *, caption: str) -> HTML:
    """A ``<figure>`` with the image embedded in the page (a base64 ``data:`` URI) and ``caption``.

    Takes a path or the file's bytes; PNG, JPEG, GIF, WebP and SVG are recognised by their content.
    An SVG is embedded as ``data:image/svg+xml``, not as inline markup: its ids cannot clash with
    another figure's, its scripts do not run, and its namespace URLs do not appear in the page.

    >>> png = b"\\x89PNG\\r\\n\\x1a\\n" + bytes(8)
    >>> figure_html(png, caption="a <tiny> figure")[:48]
    '<figure><img src="data:image/png;base64,iVBORw0K'
    """
    if isinstance(png_path_or_bytes, (bytes, bytearray, memoryview)):
        data = bytes(png_path_or_bytes)
    else:
        path = Path(png_path_or_bytes)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise TreeprobeError(f"cannot read figure {path}: {exc.strerror or exc}") from exc
    mime = _mime(data)
    uri = f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"
    cap = _esc(caption)
    return HTML(f'<figure><img src="{uri}" alt="{cap}"><figcaption>{cap}</figcaption></figure>')


_CSS = """
:root { --ink: #1b1f24; --muted: #5b6470; --rule: #d6dbe1; --band: #f2f5f8; --head: #e6ecf2;
  --accent: #0072B2; --accent2: #D55E00; --mark: #E69F00; }
* { box-sizing: border-box; }
html { -webkit-text-size-adjust: 100%; }
body { margin: 0 auto; max-width: 78rem; padding: 1.5rem 2rem 4rem; color: var(--ink); background: #fff;
  font: 16px/1.55 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
header { border-bottom: 4px solid var(--accent); padding-bottom: .75rem; margin-bottom: 1rem; }
h1 { font-size: 1.9rem; margin: .2rem 0 .5rem; line-height: 1.2; }
h2 { font-size: 1.35rem; margin: 2.2rem 0 .6rem; padding-top: .3rem; border-top: 1px solid var(--rule);
  color: var(--accent); }
dl.meta { display: grid; grid-template-columns: max-content 1fr; gap: .1rem 1rem; margin: .5rem 0 0;
  color: var(--muted); font-size: .92rem; }
dl.meta dt { font-weight: 600; } dl.meta dd { margin: 0; overflow-wrap: anywhere; }
nav.toc { background: var(--band); border-left: 4px solid var(--mark); padding: .6rem 1.2rem; margin: 1rem 0; }
nav.toc .toc-title { font-weight: 600; margin: 0 0 .2rem; }
nav.toc ol { margin: 0; padding-left: 1.4rem; columns: 2 18rem; }
a { color: var(--accent); } a:visited { color: #6a3d9a; }
code { font: .9em ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; background: var(--band);
  padding: 0 .2em; border-radius: 3px; }
pre { background: var(--band); padding: .8rem; overflow: auto; font-size: .82rem; max-height: 30rem; }
.table-wrap { overflow: auto; max-height: 38rem; width: fit-content; max-width: 100%; margin: .6rem 0 1.2rem; border: 1px solid var(--rule); }
table { border-collapse: separate; border-spacing: 0; font-size: .88rem; min-width: 40%; }
caption { caption-side: top; text-align: left; font-weight: 600; padding: .4rem .5rem; }
th, td { padding: .3rem .6rem; border-bottom: 1px solid var(--rule); text-align: left; vertical-align: top; }
thead th { position: sticky; top: 0; z-index: 2; background: var(--head); white-space: nowrap;
  border-bottom: 2px solid var(--accent); }
tbody tr:nth-child(even) td { background: var(--band); }
tbody tr:hover td { background: #fff3d6; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
th[data-type="num"] { text-align: right; }
td.na { color: var(--muted); text-align: center; }
button.sort { font: inherit; font-weight: 600; color: inherit; background: none; border: 0; padding: 0;
  cursor: pointer; }
button.sort::after { content: " \\2195"; color: var(--muted); font-size: .8em; }
th[aria-sort="ascending"] button.sort::after { content: " \\25B2"; color: var(--accent2); }
th[aria-sort="descending"] button.sort::after { content: " \\25BC"; color: var(--accent2); }
button.sort:focus-visible { outline: 2px solid var(--accent); outline-offset: 2px; }
figure { margin: 1rem 0 1.6rem; } figure img { max-width: 100%; height: auto; border: 1px solid var(--rule); }
figcaption { color: var(--muted); font-size: .92rem; margin-top: .3rem; }
.cards { display: flex; flex-wrap: wrap; gap: 0 1.2rem; align-items: flex-start; }
p.empty { color: var(--muted); font-style: italic; }
details { margin: .6rem 0; } summary { cursor: pointer; color: var(--accent); }
footer { margin-top: 3rem; color: var(--muted); font-size: .85rem; border-top: 1px solid var(--rule); }
@media print {
  body { max-width: none; padding: 0; font-size: 10.5pt; }
  nav.toc { break-after: avoid; }
  h2 { break-after: avoid; }
  .table-wrap { max-height: none; overflow: visible; border: 0; }
  thead th { position: static; } thead { display: table-header-group; }
  tr, figure { break-inside: avoid; }
  button.sort::after { content: none; }
  a { color: inherit; text-decoration: none; }
}
@page { margin: 1.5cm; }
"""

# Sorts every table.sortable by a click on a header (numeric via data-value, text otherwise; a second
# click reverses; missing values stay last). With #sorttest in the URL it sorts the first numeric
# column of the first sortable table ascending, then descending, and records both orders in
# data-sorted / data-sorted-desc (a hook for the browser test).
_JS = r"""
(function () {
  "use strict";
  function key(td, num) {
    if (!num) return td.textContent.trim().toLowerCase();
    var v = parseFloat(td.getAttribute("data-value"));
    return isNaN(v) ? null : v;
  }
  function sortBy(th) {
    var table = th.closest("table"), tbody = table.tBodies[0];
    var col = Array.prototype.indexOf.call(th.parentNode.children, th);
    var num = th.getAttribute("data-type") === "num", asc = th.getAttribute("aria-sort") !== "ascending";
    table.querySelectorAll("thead th").forEach(function (h) { h.removeAttribute("aria-sort"); });
    th.setAttribute("aria-sort", asc ? "ascending" : "descending");
    var rows = Array.prototype.map.call(tbody.rows, function (tr, i) { return [key(tr.cells[col], num), i, tr]; });
    rows.sort(function (a, b) {
      if (a[0] === null || b[0] === null) return (a[0] === null) - (b[0] === null) || a[1] - b[1];
      var c = num ? a[0] - b[0] : a[0].localeCompare(b[0], undefined, {numeric: true});
      return (asc ? c : -c) || a[1] - b[1];
    });
    rows.forEach(function (r) { tbody.appendChild(r[2]); });
  }
  document.querySelectorAll("table.sortable thead th").forEach(function (th) {
    th.addEventListener("click", function () { sortBy(th); });
  });
  if (location.hash === "#sorttest") {
    var table = document.querySelector("table.sortable");
    var th = table && table.querySelector('thead th[data-type="num"]');
    var order = function () {
      return JSON.stringify(Array.prototype.map.call(table.tBodies[0].rows, function (tr) {
        return tr.cells[th.cellIndex].getAttribute("data-value"); }));
    };
    if (th) {
      table.setAttribute("data-sorted-column", th.textContent.trim());
      th.querySelector("button").click();
      table.setAttribute("data-sorted", order());
      th.querySelector("button").click();
      table.setAttribute("data-sorted-desc", order());
    }
  }
})();
"""


def _slug(text: str, used: set) -> str:
    base = re.sub(r"[^a-z0-9]+", "-", str(text).lower()).strip("-") or "section"
    slug, i = base, 2
    while slug in used:
        slug, i = f"{base}-{i}", i + 1
    used.add(slug)
    return slug


def _block(block) -> str:
    if isinstance(block, HTML):
        return str(block)
    if isinstance(block, pd.DataFrame):
        return html_table(block)
    if isinstance(block, str):
        return _text_blocks(block)
    raise TreeprobeError(f"a section block must be HTML, a DataFrame or text, not {type(block).__name__}")


def render_html(title: str, sections: Sequence[Section], *, meta: Mapping | None = None) -> str:
    """A complete HTML5 page: ``title`` as ``<h1>``, ``meta`` (label → value) under it, a table of
    contents, then each :class:`Section` as an ``<h2>`` and its blocks. CSS and the sort script are
    inline; the page loads nothing from anywhere.

    >>> page = render_html("T <1>", [Section("A", ["Some *text*."])], meta={"seed": 0})
    >>> "<h1>T &lt;1&gt;</h1>" in page, '<a href="#a">A</a>' in page, "<em>text</em>" in page
    (True, True, True)
    """
    used: set = set()
    ids = [_slug(s.title, used) for s in sections]
    meta_html = ""
    if meta:
        rows = "".join(f"<dt>{_esc(k)}</dt><dd>{_esc(_cell_text(v) if not _is_number(v) else format_number(v))}"
                       f"</dd>" for k, v in meta.items())
        meta_html = f'<dl class="meta">{rows}</dl>'
    toc = "".join(f'<li><a href="#{i}">{_esc(s.title)}</a></li>' for s, i in zip(sections, ids))
    body = "\n".join(f'<section id="{i}">\n<h2>{_esc(s.title)}</h2>\n'
                     + "\n".join(_block(b) for b in s.blocks) + "\n</section>" for s, i in zip(sections, ids))
    from treeprobe import __version__

    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f'<meta name="generator" content="treeprobe {_esc(__version__)}">\n'
            f"<title>{_esc(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
            f"<header><h1>{_esc(title)}</h1>{meta_html}</header>\n"
            f'<nav class="toc" aria-label="Contents"><p class="toc-title">Contents</p><ol>{toc}</ol></nav>\n'
            f"<main>\n{body}\n</main>\n<footer><p>Made by treeprobe {_esc(__version__)}; "
            f"self-contained: this file loads nothing from the network.</p></footer>\n"
            f"<script>{_JS}</script>\n</body>\n</html>\n")


def write_html(html: str, path: str | os.PathLike) -> Path:
    """Write the page ``html`` to ``path`` atomically (readers see the old file or the whole new
    one); parent folders are created. Returns the path."""
    return atomic_write_text(path, html)


# --- reports -------------------------------------------------------------------------------------


def _columns(df: pd.DataFrame, wanted: Iterable[str]) -> pd.DataFrame:
    """The ``wanted`` columns that ``df`` has, in that order, without those that are all missing."""
    cols = [c for c in wanted if c in df.columns]
    return _drop_empty(df[cols]) if cols else pd.DataFrame()


def _drop_empty(df: pd.DataFrame) -> pd.DataFrame:
    keep = [c for c in df.columns if not all(_is_missing(v) or (isinstance(v, str) and not v.strip())
                                             for v in df[c])]
    return df[keep]


def _json(obj) -> str:
    from treeprobe.report import _jsonable

    return json.dumps(_jsonable(obj), indent=1, default=str, ensure_ascii=False)


def _scalars(mapping: Mapping) -> pd.DataFrame:
    rows = [(str(k), v) for k, v in mapping.items() if not isinstance(v, (dict, list, tuple, np.ndarray))]
    return pd.DataFrame({"field": [k for k, _ in rows], "value": [_cell_text(v) if not _is_number(v)
                                                                  else format_number(v, 6) for _, v in rows]})


def _figures_blocks(figures: Mapping | None) -> list:
    if not figures:
        return ["No figures were drawn."]
    return [figure_html(path, caption=str(name)) for name, path in figures.items()]


def _provenance_blocks(prov: Mapping) -> list:
    blocks: list = []
    top = _scalars(prov)
    if len(top):
        blocks.append(html_table(top, caption="Run", sortable=False))
    for key in ("data", "model", "taxonomy", "tree", "n_taxa", "timings", "stream"):
        if isinstance(prov.get(key), dict) and prov[key]:
            blocks.append(html_table(_scalars(prov[key]), caption=key.replace("_", " "), sortable=False))
    versions = prov.get("versions")
    if isinstance(versions, dict) and versions:
        blocks.append(html_table(pd.DataFrame({"package": list(versions), "version": [
            _cell_text(v) for v in versions.values()]}), caption="Versions", sortable=False))
    blocks = [HTML('<div class="cards">' + "\n".join(blocks) + "</div>")] if blocks else []
    blocks.append(HTML(f"<details><summary>Everything recorded (JSON)</summary><pre>{_esc(_json(prov))}</pre>"
                       "</details>"))
    return blocks


_MANTEL_COLS = ["level", "scheme", "method", "statistic", "p_value", "permutations", "n_items", "n_pairs",
                "estimator", "permuted"]
_CLUSTER_COLS = ["rank", "method", "k", "purity", "purity_chance", "purity_excess", "nmi", "nmi_chance", "ami",
                 "ari", "ari_chance", "n_unknown", "note"]
_KNN_COLS = ["rank", "k", "agreement", "agreement_ci95", "chance", "ceiling", "agreement_normalised",
             "agreement_excess", "level_agreement", "level_chance", "level_ceiling", "level_normalised", "top1",
             "top1_ci95", "n_evaluated", "n_excluded_singletons", "n_unknown", "note"]


def _how_to_read() -> str:
    from treeprobe.report import HOW_TO_READ

    return re.sub(r"^#+ .*\n", "", HOW_TO_READ.lstrip(), count=1)


def intrinsic_html(report, figures: Mapping[str, str | os.PathLike] | None = None) -> str:
    """The HTML page of an intrinsic :class:`~treeprobe.report.Report`: how to read it, the headline
    numbers, the Mantel, per-rank, kNN and clustering tables, skipped inputs, the figures
    (``figures``: title → PNG path, as :func:`~treeprobe.report.write_figures` returns) and the
    provenance. Write it with :func:`write_html`.
    """
    from treeprobe.report import STREAM_SECTION, n_skipped as _n_skipped, stream_summary_text

    prov = report.provenance or {}
    model = prov.get("model") if isinstance(prov.get("model"), dict) else {}
    data = prov.get("data") if isinstance(prov.get("data"), dict) else {}
    n_skipped = _n_skipped(report) if prov.get("stream") else (len(report.skipped) if report.skipped is not None else 0)
    streamed = stream_summary_text(prov)
    meta = {"Model": model.get("name", "precomputed embeddings"),
            "Data": data.get("source", MISSING),
            "Items analysed": prov.get("n_items", MISSING),
            "Skipped": n_skipped,
            "Seed": prov.get("seed", MISSING)}
    if model.get("digest"):
        meta["Model digest"] = str(model["digest"])[:16]
    head = report.headline()
    headline = pd.DataFrame({"number": list(head), "value": [
        float(v) if _is_number(v) else np.nan for v in head.values()]})
    tree_kind = prov.get("tree", {}).get("kind", "rank taxonomy") if isinstance(prov.get("tree"), dict) \
        else "rank taxonomy"
    sections = [
        Section("How to read this report", [_how_to_read()]),
        *([Section(STREAM_SECTION, [streamed])] if streamed else []),
        Section("Headline numbers", [
            f"Items analysed: {prov.get('n_items', MISSING)}; skipped: {n_skipped}. The names are the keys of "
            "`headline` in `report.json`: `_r` a Mantel statistic, `_p` its p-value, "
            "`knn_<rank>_agreement_excess` the kNN agreement above chance.",
            html_table(headline, caption="Headline numbers")]),
        Section("Mantel test: does embedding distance follow the tree?", [
            "Correlation between the cosine distance of embeddings and the patristic distance on the tree: "
            f"{tree_kind}. One-sided permutation p-value (H1: closer on the tree → closer in embedding "
            "space). `permuted` says what each p-value permuted.",
            html_table(_columns(report.mantel, _MANTEL_COLS), caption="Mantel tests")]),
        Section("Per rank", [
            "One row per rank: taxa counts, clustering scores (prefixed by the method) and kNN scores "
            "(prefixed `knn_`) next to their chance values; the same numbers as `per_rank.csv` (columns "
            "that are empty throughout are left out).",
            html_table(_drop_empty(report.per_rank()), caption="Per rank")]),
        Section("Nearest-neighbour rank agreement", [
            "Share of each item's k nearest neighbours (cosine) in its own taxon; items alone in their taxon "
            "are excluded and counted. `ceiling`: the most any embedding can reach with these taxon sizes and "
            "k; `agreement_normalised` = (agreement − chance) / (ceiling − chance). `level_agreement`: the "
            "same among neighbours outside the item's own taxon one rank below.",
            html_table(_columns(report.knn, _KNN_COLS), caption="kNN agreement")]),
        Section("Rank-wise clustering", [
            "Clustering with k = number of taxa at each rank, every score next to its chance value (same k, "
            "permuted labels); `purity_excess` = (purity − chance)/(1 − chance). At fine ranks with many "
            "single-image taxa raw purity is high by construction: read the excess.",
            html_table(_columns(report.clustering, _CLUSTER_COLS), caption="Clustering")]),
        *_phylo_sections(getattr(report, "phylo", {}) or {}),
        *_phylo_sections(getattr(report, "image_text", {}) or {}, image_text=True),
        Section("Figures", _figures_blocks(figures)),
        Section("Skipped inputs", _skipped_blocks(report.skipped, (prov.get("stream") or {}).get(
            "n_set_aside_by_reason"))),
        Section("Provenance", _provenance_blocks(prov)),
    ]
    empty = {"Mantel test: does embedding distance follow the tree?": report.mantel,
             "Nearest-neighbour rank agreement": report.knn, "Rank-wise clustering": report.clustering}
    if prov.get("analysis") == "image-text":  # `treeprobe zeroshot`: no intrinsic sections (an intrinsic report keeps them all)
        sections = [s for s in sections if not (s.title in empty and not len(empty[s.title]))]
    return render_html(f"treeprobe {prov.get('analysis', 'intrinsic')} report", sections, meta=meta)


def _phylo_sections(phylo: Mapping, *, image_text: bool = False) -> list:
    """The tree-level sections (:data:`treeprobe.report.PHYLO_SECTIONS`) present in ``phylo``; with
    ``image_text``, the image-text sections (:data:`treeprobe.report.IMAGE_TEXT_SECTIONS`)."""
    from treeprobe.report import IMAGE_TEXT_SECTIONS, PHYLO_SECTIONS

    out = []
    for title, text, tables in IMAGE_TEXT_SECTIONS if image_text else PHYLO_SECTIONS:
        blocks = [html_table(_columns(phylo[name], phylo[name].columns if cols is None else cols),
                             caption=name.replace("_", " "))
                  for name, cols in tables if name in phylo and len(phylo[name])]
        if blocks:
            out.append(Section(title, [text, *blocks]))
    return out


def _skipped_blocks(skipped: pd.DataFrame | None, by_reason: Mapping | None = None) -> list:
    if by_reason:  # a streamed report: the pass's counts, up to 5 examples each
        table = pd.DataFrame({"reason": list(by_reason), "count": [int(v) for v in by_reason.values()]})
        blocks = [f"{int(table['count'].sum())} input(s) left out by the streaming pass; nothing is dropped silently.",
                  html_table(table, caption="Skipped inputs by reason")]
        if skipped is not None and len(skipped):
            blocks.append(HTML(f"<details><summary>Examples (up to 5 per reason)</summary>"
                               f"{html_table(skipped.reset_index(drop=True), caption='Skipped inputs')}</details>"))
        return blocks
    if skipped is None or not len(skipped):
        return ["No input was left out."]
    reasons = skipped["reason"].astype(str).str.split(":").str[0].value_counts()
    by_reason = pd.DataFrame({"reason": list(reasons.index), "count": reasons.to_numpy()})
    return [f"{len(skipped)} input(s) left out; nothing is dropped silently.",
            html_table(by_reason, caption="Skipped inputs by reason"),
            HTML(f"<details><summary>All {len(skipped)} skipped inputs</summary>"
                 f"{html_table(skipped.reset_index(drop=True), caption='Skipped inputs')}</details>")]


def compare_html(per_model: pd.DataFrame, differences: pd.DataFrame, *, similarity: pd.DataFrame | None = None,
                 figures: Mapping[str, str | os.PathLike] | None = None, meta: Mapping | None = None,
                 how_to_read: str | None = None) -> str:
    """The HTML page of a comparison of several models.

    ``per_model``: one row per (model, metric, level or rank) with its estimate, interval and chance;
    ``differences``: paired differences between two models (estimates, difference, interval,
    ``p_value``, Holm-adjusted ``p_holm``); ``similarity``: model-to-model similarity (e.g. CKA and
    RSA per rank); ``figures``: title → image path; ``meta``: provenance (versions, seeds, data);
    ``how_to_read``: text of a first section (what each p-value resampled). Every column present is
    shown, so columns added later appear without a change here; a ``scheme`` column of ``differences``
    whose text is the same for many rows is listed once under the table instead of in every row.
    """
    per_model = per_model if per_model is not None else pd.DataFrame()
    differences = differences if differences is not None else pd.DataFrame()
    models = list(dict.fromkeys(per_model["model"].astype(str))) if "model" in per_model.columns else []
    header = {"Models": ", ".join(models) if models else MISSING}
    for key, value in (meta or {}).items():
        if not isinstance(value, (dict, list, tuple, np.ndarray)) and len(header) < 8:
            header[str(key)] = value
    diff_text = ("Each row compares two models on one metric at one level or rank, on the same items: "
                 "`difference` = `estimate_a` − `estimate_b` with its 95 % interval; `p_holm` is the p-value "
                 "adjusted (Holm) across ranks within the row's metric and model pair.")
    schemes = []
    if "scheme" in differences.columns:
        for scheme, metrics in differences.groupby("scheme", sort=False)["metric"]:
            schemes.append(f"- {', '.join(dict.fromkeys(metrics.astype(str)))}: {scheme}")
        differences = differences.drop(columns="scheme")
    sim = ([html_table(similarity, caption="Model-to-model similarity")] if similarity is not None
           and len(similarity) else ["Not computed."])
    sections = [Section("How to read this comparison", [how_to_read])] if how_to_read else []
    sections += [
        Section("Models", [f"{len(models)} model(s). Each estimate is shown with its interval and its chance "
                           "value where one exists.", html_table(per_model, caption="Per-model estimates")]),
        Section("Paired differences", [diff_text, html_table(differences, caption="Paired differences"),
                                       *(["What was resampled:\n\n" + "\n".join(schemes)] if schemes else [])]),
        Section("Model-to-model similarity", [
            "How alike the models' representations are (e.g. linear CKA, and RSA: the Spearman correlation "
            "of their distance matrices), per rank.", *sim]),
        Section("Figures", _figures_blocks(figures)),
        Section("Provenance", _provenance_blocks(dict(meta or {})) if meta else ["Nothing recorded."]),
    ]
    return render_html("treeprobe model comparison", sections, meta=header)
