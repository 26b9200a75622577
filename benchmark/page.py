"""The leaderboard's static page, ``leaderboards/index.html``: one self-contained file (inline CSS and vanilla JS, no
server, no network) that opens from disk.

Every (dataset, protocol) table is there, for all slices and for each category; a column header sorts the rows
by the column's numeric value (the mean, not the cell's text), the method column alphabetically, and select boxes
filter by dataset, protocol and category. A row's method opens its method card (paper, departures, weights, the
seeds) and, per record, the reproducibility manifest. The bar charts, the qualitative panels and the paper-vs-ours
tables are shown under their tables. The records' cards and manifests travel in one ``application/json`` block.

The page is a function of its inputs only (no timestamps, sorted keys), so the same records give the same bytes.
"""
from __future__ import annotations

import html
import json
import math
import re
import urllib.parse
from dataclasses import dataclass, field

import pandas as pd

from marbench.evaluation.records import Record

__all__ = ["PageTable", "render_page"]


@dataclass
class PageTable:
    """One (dataset, protocol) table of the page.

    Attributes:
        dataset, protocol: the table's names.
        caption: its caption, in the leaderboard's markdown (``**bold**``, ``\\`code\\```, blank-line paragraphs).
        records: the merged records (every method row and training seed).
        views: ``(category, display, numeric)``, ``category`` None for all slices; ``display`` and ``numeric`` as
            ``leaderboard._table`` returns them (same rows in the same order, the numeric index the plain method
            names).
        chart: the bar chart's path relative to the page, or None.
        paper_tables: markdown of the paper-vs-ours tables of this (dataset, protocol).
    """

    dataset: str
    protocol: str
    caption: str
    records: list[Record]
    views: list[tuple[str | None, pd.DataFrame, pd.DataFrame]]
    chart: str | None = None
    paper_tables: list[str] = field(default_factory=list)


def render_page(tables: list[PageTable], panels: dict[str, str] | None = None,
                title: str = "marbench leaderboard") -> str:
    """The leaderboard page as one HTML string.

    Args:
        tables: the (dataset, protocol) tables; shown grouped by dataset (sorted), in this order within one.
        panels: dataset -> path (relative to the page) of its qualitative panel figure.
        title: the page title.
    Returns:
        A complete, self-contained HTML document; identical inputs give identical text.
    """
    panels = panels or {}
    datasets = sorted({t.dataset for t in tables} | set(panels))
    protocols = sorted({t.protocol for t in tables})
    categories = sorted({c for t in tables for c, _, _ in t.views if c is not None})
    cards: list[dict] = []
    card_index: dict[str, int] = {}
    records: dict[str, dict] = {}
    for t in tables:
        for r in t.records:
            card = _jsonable(r.method)
            key = json.dumps(card, sort_keys=True)
            if key not in card_index:
                card_index[key] = len(cards)
                cards.append(card)
            records[r.name] = {"card": card_index[key], "seed": r.seed, "manifest": _jsonable(r.manifest),
                               "dataset": _jsonable(r.dataset),
                               "protocol": {"name": r.protocol["name"], "version": r.protocol.get("version")}}
    body = []
    for dataset in datasets:
        if dataset in panels:
            body.append(f'<section class="panel" data-dataset="{_e(dataset)}"><h2>{_e(dataset)}: example slice</h2>'
                        f'<figure><img src="{_url(panels[dataset])}" alt="{_e(dataset)} qualitative panel" '
                        f'loading="lazy"></figure></section>')
        body += [_board(t) for t in tables if t.dataset == dataset]
    filters = "".join(
        f'<label>{label} <select id="filter-{name}">{options}</select></label>'
        for label, name, options in (
            ("dataset", "dataset", _options([("*", "all datasets")] + [(d, d) for d in datasets])),
            ("protocol", "protocol", _options([("*", "all protocols")] + [(p, p) for p in protocols])),
            ("category", "category", _options([("", "all slices")] + [(c, c) for c in categories]))))
    return "".join([
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">",
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">",
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>\n",
        f"<header><h1>{_e(title)}</h1><nav class=\"filters\">{filters}",
        "<span class=\"hint\">click a column header to sort; a method for its card and manifests</span></nav>"
        "</header>\n<main>\n",
        "\n".join(body),
        "\n<p id=\"no-match\" hidden>No table matches these filters.</p>\n</main>\n",
        "<dialog id=\"card\"><form method=\"dialog\"><button class=\"close\" aria-label=\"close\">×</button></form>"
        "<div id=\"card-body\"></div></dialog>\n",
        f"<script type=\"application/json\" id=\"marbench-data\">{_script_json({'cards': cards, 'records': records})}"
        "</script>\n",
        f"<script>{_JS}</script>\n</body></html>\n",
    ])


def _board(t: PageTable) -> str:
    specs = {s["name"]: s for s in t.records[0].metric_specs} if t.records else {}
    by_method: dict[str, list[str]] = {}
    for r in sorted(t.records, key=lambda r: (r.method["name"], r.seed)):
        by_method.setdefault(r.method["name"], []).append(r.name)
    ident = _slug(f"{t.dataset}__{t.protocol}")
    views = []
    for category, display, numeric in t.views:
        extra = ""
        if category is None:
            if t.chart:
                extra += (f'<figure class="chart"><img src="{_url(t.chart)}" alt="{_e(t.dataset)} / {_e(t.protocol)} '
                          f'bar charts" loading="lazy"></figure>')
            extra += "".join(f'<div class="paper">{_markdown_html(md)}</div>' for md in t.paper_tables)
        heading = "" if category is None else f"<h3>category: {_e(category)}</h3>"
        hidden = "" if category is None else " hidden"
        vid = f"t-{ident}" if category is None else f"t-{ident}--{_slug(category)}"
        views.append(f'<div class="view" data-category="{_e(category or "")}"{hidden}>{heading}'
                     f'<div class="scroll">{_table_html(vid, display, numeric, specs, by_method)}</div>{extra}</div>')
    return (f'<section class="board" id="{ident}" data-dataset="{_e(t.dataset)}" data-protocol="{_e(t.protocol)}">'
            f'<h2>{_e(t.dataset)} / {_e(t.protocol)}</h2><div class="caption">{_markdown_html(t.caption)}</div>'
            + "".join(views) + "</section>")


def _table_html(ident: str, display: pd.DataFrame, numeric: pd.DataFrame, specs: dict[str, dict],
                by_method: dict[str, list[str]]) -> str:
    head = ['<th scope="col" data-kind="text" data-first="asc"><button type="button">method</button></th>']
    keys = []
    for col in display.columns:
        col = str(col)
        metric = col[:-2] if col.endswith((" ↑", " ↓")) else col
        keys.append(metric)
        # a metric sorts best first on the first click; the bookkeeping columns smallest first
        first = "desc" if col.endswith(" ↑") else "asc"
        spec = specs.get(metric)
        tip = ""
        if spec:
            unit = f" ({spec['unit']})" if spec.get("unit") else ""
            tip = f' title="{_e(spec.get("description", "") + unit)}"'
        head.append(f'<th scope="col" data-kind="number" data-first="{first}"{tip}><button type="button">'
                    f'{_e(col)}</button></th>')
    rows = []
    for label, name, cells in zip(display.index, numeric.index, display.itertuples(index=False), strict=True):
        recs = _e(json.dumps(by_method.get(str(name), [])))
        tds = [f'<th scope="row" data-sort="{_e(str(name))}"><button type="button" class="method" '
               f'data-records="{recs}">{_e(str(label))}</button></th>']
        for metric, cell in zip(keys, cells, strict=True):
            value = numeric.at[name, metric] if metric in numeric.columns else float("nan")
            tds.append(f'<td data-sort="{_sort_key(value)}">{_cell_html(str(cell))}</td>')
        rows.append("<tr>" + "".join(tds) + "</tr>")
    return (f'<table class="sortable" id="{ident}"><thead><tr>{"".join(head)}</tr></thead><tbody>\n' + "\n".join(rows)
            + "\n</tbody></table>")


def _sort_key(value) -> str:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return ""
    # twelve significant digits order any two cells the table tells apart, at half the bytes of repr
    return f"{v:.12g}" if math.isfinite(v) else ""


def _cell_html(cell: str) -> str:
    """A table cell's value first, its interval and seed spread smaller underneath."""
    main, sep, rest = cell.partition(" [")
    if sep:
        rest = "[" + rest
    else:
        main, _, rest = cell.partition("; ")
    return _inline(main) + (f' <span class="ci">{_inline(rest)}</span>' if rest else "")


def _inline(text: str) -> str:
    text = html.escape(text, quote=True)
    text = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", text)
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", text)


def _markdown_html(md: str) -> str:
    """The little markdown the leaderboard writes: headings, pipe tables and paragraphs."""
    out, para, table = [], [], []

    def flush() -> None:
        if para:
            out.append(f"<p>{_inline(' '.join(para))}</p>")
            para.clear()
        if table:
            cells = [[c.strip() for c in line.strip().strip("|").split("|")] for line in table
                     if not re.fullmatch(r"\|(\s*:?-+:?\s*\|)+", line.strip())]
            head, *body = cells
            out.append('<div class="scroll"><table class="static"><thead><tr>'
                       + "".join(f"<th>{_inline(c)}</th>" for c in head) + "</tr></thead><tbody>"
                       + "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>" for row in body)
                       + "</tbody></table></div>")
            table.clear()

    for line in md.splitlines():
        if line.startswith("|"):
            if para:
                flush()
            table.append(line)
            continue
        if table:
            flush()
        if not line.strip():
            flush()
        elif line.startswith("#"):
            flush()
            out.append(f"<h4>{_inline(line.lstrip('#').strip())}</h4>")
        else:
            para.append(line.strip())
    flush()
    return "".join(out)


def _options(pairs: list[tuple[str, str]]) -> str:
    return "".join(f'<option value="{_e(v)}">{_e(label)}</option>' for v, label in pairs)


def _e(text: str) -> str:
    return html.escape(str(text), quote=True)


def _url(path: str) -> str:
    # a dataset name is free text; '#' or '?' in it must not end the file path
    return _e(urllib.parse.quote(path))


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text)


def _jsonable(obj):
    """``obj`` with non-finite floats as strings: JSON.parse rejects NaN and Infinity."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def _script_json(obj) -> str:
    """JSON safe inside a ``<script>`` element: ``<`` (hence ``</script>`` and ``<!--``), ``>`` and ``&`` occur only
    inside JSON strings, where their ``\\u`` escapes mean the same to JSON.parse and nothing to the HTML parser."""
    text = json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


_CSS = """
:root { --fg: #1d232b; --muted: #5b6672; --line: #d9dee4; --accent: #1f5fa8; --bg-alt: #f5f7f9; }
* { box-sizing: border-box; }
[hidden] { display: none !important; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg); }
header { position: sticky; top: 0; z-index: 2; background: #fff; border-bottom: 1px solid var(--line);
  padding: .5rem 1rem; display: flex; flex-wrap: wrap; align-items: baseline; gap: .5rem 1.5rem; }
h1 { font-size: 1.25rem; margin: 0; }
.filters { display: flex; flex-wrap: wrap; gap: .5rem 1rem; align-items: center; }
.filters label { color: var(--muted); }
.filters select { font: inherit; padding: .1rem .3rem; }
.hint { color: var(--muted); font-size: .85rem; }
main { padding: 0 1rem 2rem; }
section { margin: 1.5rem 0; scroll-margin-top: 5rem; }
h2 { font-size: 1.1rem; margin: 0 0 .3rem; }
h3 { font-size: 1rem; margin: .6rem 0 .3rem; }
h4 { font-size: .95rem; margin: .8rem 0 .3rem; }
.caption, .paper p { color: var(--muted); font-size: .85rem; max-width: 75rem; }
.caption p { margin: .2rem 0; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-size: .85rem; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid var(--line); padding: .2rem .45rem; text-align: right; vertical-align: top;
  white-space: nowrap; }
thead th { background: var(--bg-alt); }
tbody tr:nth-child(even) { background: #fafbfc; }
tbody th, thead th:first-child { text-align: left; }
th button { font: inherit; font-weight: 600; border: 0; background: none; padding: 0; cursor: pointer;
  color: inherit; text-align: inherit; }
thead th button::after { content: " \\2195"; color: #b3bcc6; }
thead th[aria-sort="ascending"] button::after { content: " \\25B2"; color: var(--accent); }
thead th[aria-sort="descending"] button::after { content: " \\25BC"; color: var(--accent); }
button.method { color: var(--accent); text-decoration: underline dotted; }
.ci { display: block; color: var(--muted); font-size: .75rem; }
table.static :is(td, th):nth-child(-n+2) { text-align: left; }
figure { margin: .6rem 0; }
figure img { max-width: 100%; height: auto; border: 1px solid var(--line); }
dialog { max-width: min(60rem, 95vw); max-height: 90vh; border: 1px solid var(--line); border-radius: 6px;
  padding: 1rem 1.25rem; }
dialog::backdrop { background: rgba(20, 25, 30, .35); }
dialog .close { float: right; font-size: 1.3rem; border: 0; background: none; cursor: pointer; }
dialog dt { font-weight: 600; margin-top: .4rem; }
dialog dd { margin: 0 0 0 1rem; }
dialog ul { margin: .1rem 0; padding-left: 1.2rem; }
dialog pre { background: var(--bg-alt); padding: .5rem; overflow: auto; max-height: 50vh; font-size: .78rem; }
#no-match { color: var(--muted); }
"""

_JS = r"""
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("marbench-data").textContent);

  function compare(a, b, numeric) {
    if (numeric) {
      var x = a === "" ? NaN : parseFloat(a), y = b === "" ? NaN : parseFloat(b);
      if (isNaN(x) || isNaN(y)) { return isNaN(x) ? (isNaN(y) ? 0 : 1) : -1; }
      return x - y;
    }
    return a < b ? -1 : (a > b ? 1 : 0);
  }

  function sortBy(th) {
    var table = th.closest("table"), tbody = table.tBodies[0];
    var col = Array.prototype.indexOf.call(th.parentNode.children, th);
    var first = th.getAttribute("data-first") === "desc" ? "descending" : "ascending";
    var other = first === "ascending" ? "descending" : "ascending";
    var dir = th.getAttribute("aria-sort") === first ? other : first;
    var numeric = th.getAttribute("data-kind") === "number";
    Array.prototype.forEach.call(table.querySelectorAll("thead th[aria-sort]"), function (h) {
      h.removeAttribute("aria-sort");
    });
    th.setAttribute("aria-sort", dir);
    var sign = dir === "ascending" ? 1 : -1;
    var rows = Array.prototype.map.call(tbody.rows, function (tr, i) {
      return {tr: tr, key: tr.cells[col].getAttribute("data-sort") || "", i: i};
    });
    rows.sort(function (a, b) {
      // rows without a value stay last in both directions
      if (numeric && (a.key === "" || b.key === "")) { return compare(a.key, b.key, true) || a.i - b.i; }
      return sign * compare(a.key, b.key, numeric) || a.i - b.i;
    });
    rows.forEach(function (r) { tbody.appendChild(r.tr); });
  }

  Array.prototype.forEach.call(document.querySelectorAll("table.sortable > thead th"), function (th) {
    th.querySelector("button").addEventListener("click", function () { sortBy(th); });
  });

  var filters = ["dataset", "protocol", "category"].map(function (name) {
    return document.getElementById("filter-" + name);
  });

  function applyFilters() {
    var ds = filters[0].value, pr = filters[1].value, cat = filters[2].value, shown = 0;
    Array.prototype.forEach.call(document.querySelectorAll("section.board"), function (s) {
      var has = false;
      Array.prototype.forEach.call(s.querySelectorAll(":scope > .view"), function (v) {
        v.hidden = v.getAttribute("data-category") !== cat;
        has = has || !v.hidden;
      });
      s.hidden = !(has && (ds === "*" || s.getAttribute("data-dataset") === ds) &&
                   (pr === "*" || s.getAttribute("data-protocol") === pr));
      shown += s.hidden ? 0 : 1;
    });
    Array.prototype.forEach.call(document.querySelectorAll("section.panel"), function (p) {
      p.hidden = !(ds === "*" || p.getAttribute("data-dataset") === ds);
    });
    document.getElementById("no-match").hidden = shown > 0;
  }
  filters.forEach(function (f) { f.addEventListener("change", applyFilters); });
  applyFilters();

  function el(tag, text, cls) {
    var e = document.createElement(tag);
    if (text !== undefined) { e.textContent = text; }
    if (cls) { e.className = cls; }
    return e;
  }

  function value(v) {
    if (Array.isArray(v)) {
      if (!v.length) { return el("span", "none"); }
      var ul = el("ul");
      v.forEach(function (x) { ul.appendChild(el("li", typeof x === "string" ? x : JSON.stringify(x))); });
      return ul;
    }
    if (v !== null && typeof v === "object") {
      var keys = Object.keys(v).sort();
      if (!keys.length) { return el("span", "none"); }
      var list = el("ul");
      keys.forEach(function (k) {
        list.appendChild(el("li", k + ": " + (typeof v[k] === "string" ? v[k] : JSON.stringify(v[k]))));
      });
      return list;
    }
    if (typeof v === "boolean") { return el("span", v ? "yes" : "no"); }
    return el("span", String(v));
  }

  var ORDER = ["paper", "departures", "weights", "metal", "puts_metal_back", "trainable", "inputs",
               "training_inputs"];

  function showCard(button) {
    var names = JSON.parse(button.getAttribute("data-records"));
    var recs = names.filter(function (n) { return n in data.records; }).map(function (n) {
      var r = data.records[n];
      return {name: n, card: r.card, seed: r.seed, protocol: r.protocol, dataset: r.dataset, manifest: r.manifest};
    });
    var body = document.getElementById("card-body");
    body.textContent = "";
    if (!recs.length) { body.appendChild(el("p", "no record")); document.getElementById("card").showModal(); return; }
    var card = data.cards[recs[0].card];
    body.appendChild(el("h2", card.name));
    var dl = el("dl");
    var keys = ORDER.filter(function (k) { return k in card; }).concat(Object.keys(card).sort().filter(
      function (k) { return k !== "name" && ORDER.indexOf(k) < 0; }));
    keys.forEach(function (k) {
      dl.appendChild(el("dt", k.replace(/_/g, " ")));
      var dd = el("dd");
      dd.appendChild(value(card[k]));
      dl.appendChild(dd);
    });
    dl.appendChild(el("dt", "seeds"));
    dl.appendChild(el("dd", recs.map(function (r) { return r.seed; }).join(", ")));
    body.appendChild(dl);
    if (recs.some(function (r) { return r.card !== recs[0].card; })) {
      body.appendChild(el("p", "The records of this row carry different method cards; shown: the first seed's."));
    }
    body.appendChild(el("h3", "records"));
    recs.forEach(function (r) {
      var d = el("details", undefined, "manifest");
      d.appendChild(el("summary", r.name + " (seed " + r.seed + ", protocol " + r.protocol.name + " v" +
                               r.protocol.version + ", git " + String(r.manifest.git_sha || "?").slice(0, 12) +
                               (r.manifest.git_dirty ? ", dirty" : "") + ")"));
      d.appendChild(el("pre", JSON.stringify({dataset: r.dataset, manifest: r.manifest}, null, 2)));
      body.appendChild(d);
    });
    document.getElementById("card").showModal();
  }

  Array.prototype.forEach.call(document.querySelectorAll("button.method"), function (b) {
    b.addEventListener("click", function () { showCard(b); });
  });
}());
"""
