"""The self-contained HTML report: pure checks of the markup, then a real intrinsic report opened in
headless Chromium (a screenshot that is not blank; the DOM after the sort script ran)."""

from __future__ import annotations

import base64
import io
import json
import math
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import treeprobe as tp
from treeprobe.html_report import (HTML, Section, compare_html, figure_html, format_number, html_table,
                                   intrinsic_html, render_html, write_html)
from treeprobe.report import Report, write_figures

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_browser = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (CI installs Debian's "
                                   "`chromium` package: apt-get install -y chromium)")

EXTERNAL = ("http://", "https://", "//cdn", "<link", 'src="http')
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

SECTIONS = ["How to read this report", "Headline numbers", "Mantel test: does embedding distance follow the tree?",
            "Per rank", "Nearest-neighbour rank agreement", "Rank-wise clustering", "Figures", "Skipped inputs",
            "Provenance"]


class _Dom(HTMLParser):
    """Headings, tables (attributes, header cells, body rows) and images of a page."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.headings: dict[str, list[str]] = {"h1": [], "h2": []}
        self.tables: list[dict] = []
        self.imgs: list[dict] = []
        self._heading = None
        self._stack: list[dict] = []  # open tables (a table inside <details> is still a table)
        self._cell = None
        self._part = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag in self.headings:
            self._heading = [tag, ""]
        elif tag == "table":
            self._stack.append(dict(attrs=attrs, header=[], rows=[]))
        elif self._stack and tag in ("thead", "tbody"):
            self._part = tag
        elif self._stack and tag == "tr" and self._part == "tbody":
            self._stack[-1]["rows"].append([])
        elif self._stack and tag in ("th", "td"):
            self._cell = dict(tag=tag, attrs=attrs, text="")
        elif tag == "img":
            self.imgs.append(attrs)

    def handle_data(self, data):
        if self._heading is not None:
            self._heading[1] += data
        if self._cell is not None:
            self._cell["text"] += data

    def handle_endtag(self, tag):
        if tag in self.headings and self._heading is not None:
            self.headings[tag].append(" ".join(self._heading[1].split()))
            self._heading = None
        elif tag in ("th", "td") and self._cell is not None and self._stack:
            cell, self._cell = self._cell, None
            cell["text"] = " ".join(cell["text"].split())
            if self._part == "thead":
                self._stack[-1]["header"].append(cell)
            elif self._stack[-1]["rows"]:
                self._stack[-1]["rows"][-1].append(cell)
        elif tag == "table" and self._stack:
            self.tables.append(self._stack.pop())
            self._part = None


def parse(page: str) -> _Dom:
    dom = _Dom()
    dom.feed(page)
    dom.close()
    return dom


def assert_no_external_url(page: str):
    for needle in EXTERNAL:
        assert needle not in page, f"the page contains {needle!r}"


# --- a real intrinsic report, built once -----------------------------------------------------------


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """300 real BioCLIP 2 items, analysed (99 permutations, t-SNE, k-means), figures drawn, page written."""
    out = tmp_path_factory.mktemp("html_report")
    ds = tp.datasets.bioclip2_1k()[:300]
    report = tp.tl.intrinsic(ds, permutations=99, maps=("tsne",), cluster_methods=("kmeans",),
                             chance_permutations=5, progress=False,
                             provenance=dict(data=dict(source="example bioclip2-1k (bundled)"),
                                             model=dict(name="precomputed embeddings", digest=None)))
    figures = write_figures(report, out / "figures")
    page = intrinsic_html(report, figures)
    path = write_html(page, out / "report.html")
    return dict(report=report, figures=figures, page=page, path=Path(path), out=out)


def chromium(*args, cwd):
    """Run headless Chromium; its own profile folder, so parallel or sandboxed runs do not collide."""
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
           "--no-default-browser-check", "--hide-scrollbars", f"--user-data-dir={cwd / 'chromium-profile'}",
           *args]
    res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=90)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout


def test_written_page_is_the_rendered_page_and_self_contained(built):
    page = built["path"].read_text(encoding="utf-8")
    assert page == built["page"]
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert_no_external_url(page)
    assert page.count("<script") == 1 and "<style>" in page
    dom = parse(page)
    assert dom.headings["h1"] == ["treeprobe intrinsic report"]
    assert dom.headings["h2"] == SECTIONS
    for title in SECTIONS:  # the table of contents links every section
        assert f'">{title}</a></li>' in page


@needs_browser
def test_screenshot_is_not_blank(built):
    out = built["out"]
    chromium("--screenshot=" + str(out / "shot.png"), "--window-size=1280,2400", built["path"].as_uri(), cwd=out)
    from PIL import Image  # pillow comes with matplotlib

    img = np.asarray(Image.open(out / "shot.png").convert("RGB"))
    assert img.shape == (2400, 1280, 3)
    non_white = (img.min(axis=2) < 245).mean()
    colours = len(np.unique((img // 16).reshape(-1, 3), axis=0))
    assert non_white > 0.10, f"only {non_white:.1%} of the screenshot is not white"
    assert colours >= 10, f"only {colours} distinct colours in the screenshot"
    accent = (np.abs(img.astype(int) - [0x00, 0x72, 0xB2]).max(axis=2) < 40).sum()  # the blue headings
    assert accent > 200


@needs_browser
def test_dom_after_the_script_ran(built):
    out, report = built["out"], built["report"]
    dom_text = chromium("--virtual-time-budget=2000", "--dump-dom", built["path"].as_uri() + "#sorttest", cwd=out)
    dom = parse(dom_text)
    assert dom.headings["h1"] == ["treeprobe intrinsic report"]
    assert dom.headings["h2"] == SECTIONS

    assert len([t for t in dom.tables if "sortable" in t["attrs"].get("class", "")]) >= 5

    # tables are identified by their first header cells
    def by_header(first_cols):
        for t in dom.tables:
            names = [h["text"] for h in t["header"]]
            if names[:len(first_cols)] == first_cols:
                return t, names
        raise AssertionError(f"no table starting with columns {first_cols}")

    mantel, names = by_header(["level", "scheme", "method", "statistic", "p_value"])
    assert {"n_pairs", "permuted"} <= set(names) and len(mantel["rows"]) == len(report.mantel) == 4
    per_rank, names = by_header(["rank", "n_taxa"])
    assert {"knn_agreement", "kmeans_purity"} <= set(names) and len(per_rank["rows"]) == 7
    assert [r[0]["text"] for r in per_rank["rows"]] == list(tp.RANKS)
    knn, names = by_header(["rank", "k", "agreement"])
    assert {"chance", "ceiling"} <= set(names) and len(knn["rows"]) == 7
    clus, names = by_header(["rank", "method", "k", "purity"])
    assert {"purity_chance", "nmi"} <= set(names) and len(clus["rows"]) == 7
    skipped, _ = by_header(["reason", "count"])
    assert sum(int(r[1]["attrs"]["data-value"]) for r in skipped["rows"]) == len(report.skipped) == 128

    # numbers: short text, full value for sorting
    stat = mantel["rows"][0][names_index(mantel, "statistic")]
    assert float(stat["attrs"]["data-value"]) == pytest.approx(report.mantel["statistic"].iloc[0], rel=1e-12)
    assert len(stat["text"]) <= 6

    # every figure is an embedded PNG of real size
    assert len(dom.imgs) == len(built["figures"]) == 3
    for img in dom.imgs:
        src = img["src"]
        assert src.startswith("data:image/png;base64,")
        data = base64.b64decode(src.split(",", 1)[1])
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000
        from PIL import Image

        w, h = Image.open(io.BytesIO(data)).size
        assert w > 300 and h > 200
        assert img["alt"] in built["figures"]

    # the sort script ran: the first numeric column of the first sortable table, asc then desc
    first = next(t for t in dom.tables if "sortable" in t["attrs"].get("class", ""))
    assert first["attrs"].get("data-sorted-column") == "value"
    asc = [float(v) for v in json.loads(first["attrs"]["data-sorted"])]
    desc = [float(v) for v in json.loads(first["attrs"]["data-sorted-desc"])]
    static = next(t for t in parse(built["page"]).tables if "sortable" in t["attrs"].get("class", ""))
    before = [float(r[1]["attrs"]["data-value"]) for r in static["rows"]]
    finite = lambda xs: [x for x in xs if not math.isnan(x)]  # noqa: E731
    n_nan = len(before) - len(finite(before))
    assert len(asc) == len(desc) == len(before) == len(report.headline())
    assert finite(asc) == sorted(finite(before)) != finite(before)  # sorted, and the sort moved rows
    assert finite(desc) == sorted(finite(before), reverse=True)
    assert all(math.isnan(x) for x in asc[len(asc) - n_nan:] + desc[len(desc) - n_nan:])  # missing last
    col = [h["text"] for h in first["header"]].index("value")
    assert first["header"][col]["attrs"].get("aria-sort") == "descending"
    shown = [float(r[col]["attrs"]["data-value"]) for r in first["rows"]]
    assert shown == desc  # the DOM rows are in the order the script recorded last


def names_index(t, name):
    return [h["text"] for h in t["header"]].index(name)


# --- pure tests: no browser, small frames -----------------------------------------------------------


def test_table_numbers_carry_full_sort_keys_and_nan_shows_a_dash():
    df = pd.DataFrame({"taxon": ["Apis", "Bombus", "Vespa"], "r": [0.123456789, np.nan, 12345.678],
                       "n": [3, 10, 200]})
    t = html_table(df, caption="scores")
    dom = parse(t)
    (table,) = dom.tables
    assert [h["text"] for h in table["header"]] == ["taxon", "r", "n"]
    assert [h["attrs"]["data-type"] for h in table["header"]] == ["text", "num", "num"]
    assert len(table["rows"]) == 3
    r = [row[1] for row in table["rows"]]
    assert [c["text"] for c in r] == ["0.123", "–", "12346"]
    assert [c["attrs"]["data-value"] for c in r] == ["0.123456789", "NaN", "12345.678"]
    assert [row[2]["attrs"]["data-value"] for row in table["rows"]] == ["3", "10", "200"]
    assert "data-value" not in table["rows"][0][0]["attrs"]  # text cells sort by their text
    assert html_table(df, digits=5).count(">0.12346<") == 1
    assert "sortable" not in html_table(df, sortable=False)
    assert "<caption>scores</caption>" in t


def test_missing_values_and_odd_cells():
    df = pd.DataFrame({"a": [None, "x"], "b": pd.array([1, None], dtype="Int64"), "c": [{"k": 1}, [1, 2]],
                       "d": [True, False], "e": [float("inf"), -float("inf")]})
    dom = parse(html_table(df))
    (table,) = dom.tables
    assert [c["text"] for c in table["rows"][0]] == ["–", "1", '{"k": 1}', "True", "∞"]
    assert [c["text"] for c in table["rows"][1]] == ["x", "–", "[1, 2]", "False", "−∞"]
    assert table["header"][3]["attrs"]["data-type"] == "text"  # booleans are not numbers
    assert html_table(pd.DataFrame()) == '<p class="empty">No rows.</p>'
    assert "no rows" in html_table(pd.DataFrame(columns=["a"]), caption="Empty")


def test_format_number():
    assert format_number(0.99996) == "1"
    assert format_number(-0.0123456) == "-0.0123"
    assert format_number(np.float32(0.5)) == "0.5"
    assert format_number(np.int64(7)) == "7"
    assert format_number(1.5e-9, 2) == "1.5e-09"
    assert format_number(None) == "–"


def test_a_taxon_named_script_is_escaped_everywhere():
    evil = "<script>alert(1)</script>"
    skipped = pd.DataFrame({"item": [evil, "row 2"], "reason": [f"no taxonomy: {evil}", "unreadable"]})
    report = Report(mantel=pd.DataFrame(), clustering=pd.DataFrame(), knn=pd.DataFrame(),
                    rank_summary=pd.DataFrame({"rank": ["species"], "n_taxa": [1], "example": [evil]}),
                    provenance={"seed": 0, "n_items": 1, "data": {"source": evil}}, skipped=skipped)
    page = intrinsic_html(report)
    assert page.count("<script") == 1  # ours only
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    page2 = render_html(evil, [Section(evil, [evil, html_table(pd.DataFrame({evil: [evil]}), caption=evil)])],
                        meta={evil: evil})
    assert page2.count("<script") == 1 and "alert(1)</script>" not in page2
    dom = parse(page)
    assert dom.headings["h2"] == SECTIONS  # empty tables still give every section


def test_no_external_url_even_when_the_provenance_has_one():
    report = Report(mantel=pd.DataFrame(), clustering=pd.DataFrame(), knn=pd.DataFrame(),
                    rank_summary=pd.DataFrame({"rank": ["kingdom"], "n_taxa": [2]}),
                    provenance={"data": {"source": "https://example.org/data.parquet"},
                                "command": "treeprobe intrinsic --embeddings http://cdn.example/x"})
    page = intrinsic_html(report)
    assert_no_external_url(page)
    assert "example.org/data.parquet" in page  # shown, but not as a URL


def test_paragraph_text_markup():
    page = render_html("T", [Section("S", ["One **bold** `code` *em*.\n\n- item one\n  continued\n- item 2",
                                           HTML("<p id='raw'>raw</p>"), pd.DataFrame({"x": [1]})])])
    assert "<p>One <strong>bold</strong> <code>code</code> <em>em</em>.</p>" in page
    assert "<ul><li>item one continued</li><li>item 2</li></ul>" in page
    assert "<p id='raw'>raw</p>" in page and 'data-value="1"' in page
    with pytest.raises(tp.TreeprobeError):
        render_html("T", [Section("S", [42])])


def test_figure_html_png_bytes_and_svg_file(tmp_path):
    png = PNG_MAGIC + bytes(64)
    fig = figure_html(png, caption="a <b> figure")
    assert fig.startswith('<figure><img src="data:image/png;base64,')
    assert base64.b64decode(re.search(r"base64,([^\"]+)", fig).group(1)) == png
    assert "a &lt;b&gt; figure</figcaption>" in fig
    svg = tmp_path / "f.svg"
    svg.write_text('<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="4" height="4">'
                   '<rect width="4" height="4"/></svg>')
    fig = figure_html(svg, caption="vector")
    assert "data:image/svg+xml;base64," in fig
    assert_no_external_url(fig)
    with pytest.raises(tp.TreeprobeError):
        figure_html(b"not an image", caption="x")
    with pytest.raises(tp.TreeprobeError):
        figure_html(tmp_path / "missing.png", caption="x")


def test_write_html_is_atomic_and_creates_folders(tmp_path):
    path = write_html("<!DOCTYPE html><p>é</p>", tmp_path / "a" / "b" / "r.html")
    assert path.read_text(encoding="utf-8") == "<!DOCTYPE html><p>é</p>"
    assert [p.name for p in path.parent.iterdir()] == ["r.html"]  # no temporary left behind


def _comparison_frames():
    per_model = pd.DataFrame({
        "model": ["bioclip2", "bioclip2", "clip"], "metric": ["mantel_r", "knn_agreement", "mantel_r"],
        "level_or_rank": ["image", "order", "image"], "estimate": [0.16, 0.42, 0.08],
        "ci_low": [0.12, 0.4, 0.05], "ci_high": [0.2, 0.44, 0.11], "chance": [np.nan, 0.05, np.nan],
        "added_later": ["a", "b", "c"]})
    differences = pd.DataFrame({
        "metric": ["mantel_r"], "level_or_rank": ["image"], "model_a": ["bioclip2"], "model_b": ["clip"],
        "estimate_a": [0.16], "estimate_b": [0.08], "difference": [0.08], "ci_low": [0.03], "ci_high": [0.13],
        "p_value": [0.002], "p_holm": [0.004], "scheme": ["species"]})
    similarity = pd.DataFrame({"model_a": ["bioclip2"] * 2, "model_b": ["clip"] * 2, "rank": ["order", "genus"],
                               "cka": [0.61, 0.55], "rsa_spearman": [0.48, np.nan]})
    return per_model, differences, similarity


def test_compare_html_renders_every_column(tmp_path):
    per_model, differences, similarity = _comparison_frames()
    png = tmp_path / "f.png"
    png.write_bytes(PNG_MAGIC + bytes(32))
    page = compare_html(per_model, differences, similarity=similarity, figures={"Forest plot": png},
                        meta={"seed": 0, "versions": {"numpy": "2.0"}, "data": {"source": "bioclip2-1k"}})
    assert_no_external_url(page)
    dom = parse(page)
    assert dom.headings["h1"] == ["treeprobe model comparison"]
    assert dom.headings["h2"] == ["Models", "Paired differences", "Model-to-model similarity", "Figures",
                                  "Provenance"]
    headers = [[h["text"] for h in t["header"]] for t in dom.tables]
    # the scheme text is listed once under the differences table, not repeated in every row
    assert list(per_model.columns) in headers and [c for c in differences.columns if c != "scheme"] in headers
    assert list(similarity.columns) in headers
    assert "What was resampled" in page and "mantel_r: species" in page
    sim = dom.tables[headers.index(list(similarity.columns))]
    assert [c["text"] for c in sim["rows"][1]][-1] == "–" and len(sim["rows"]) == 2
    assert len(dom.imgs) == 1 and dom.imgs[0]["alt"] == "Forest plot"
    assert "bioclip2, clip" in page  # the models named in the header
    bare = compare_html(per_model, differences)
    assert "Not computed." in bare and "No figures were drawn." in bare and "Nothing recorded." in bare
