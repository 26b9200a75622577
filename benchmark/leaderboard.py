"""Leaderboards: merge result records into tables and figures under ``leaderboards/``.

For every (dataset, protocol) the records of all method rows and training seeds are merged into one table: a
row per method, a column per metric (the metric's own declaration, ``protocols.MetricSpec``, gives its
direction, unit and digits). A cell is ``mean ± std [95 % bootstrap interval of the mean]`` over slices, the
slice values first averaged over the row's training seeds; rows trained with several seeds add ``; seeds ± s``,
the standard deviation of the per-seed means. The best value is bold only where it holds across seeds (every
seed of the best row beats every seed of each other row) and not when all rows tie. Metrics undefined in a
scope (a tissue class that no slice of it holds) get no column. Records whose split hash, protocol version or
backbone weights differ are refused, naming both.

Also: per-category tables, paired Wilcoxon tests against the best row, a horizontal bar chart per metric
(sorted, with the bootstrap interval as whiskers), a qualitative panel (input, each method, target, error maps;
Emirdagi et al. Fig. 2 style), the paper-vs-ours tables that methods declare (``MARMethod.paper_tables``) and
``index.html``. Every file is written to a temporary name and renamed.
"""
from __future__ import annotations

import os
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from marbench.evaluation.records import Record, read_record
from marbench.evaluation.statistics import bootstrap_ci, paired_wilcoxon
from marbench.files import atomic_write
from marbench.method import METHODS, PaperTable
from marbench.page import PageTable, render_page

__all__ = ["build_leaderboards", "check_leaderboards", "merge_records", "paper_table_markdown", "Row",
           "TABLE_NAME"]

TABLE_NAME = "{dataset}__{protocol}"
_ORDER_FIRST = ("uncorrected", "clean-image")


def merge_records(records: list[Record]) -> dict[tuple[str, str], list[Record]]:
    """Group records by (dataset, protocol), refusing mixed split hashes, protocol versions or backbone weights.

    Raises:
        ValueError: two records of one (dataset, protocol) that differ in one of those (names both records).
    """
    groups: dict[tuple[str, str], list[Record]] = defaultdict(list)
    for r in records:
        groups[(r.dataset["name"], r.protocol["name"])].append(r)
    for key, rs in groups.items():
        first = rs[0]
        for r in rs[1:]:
            for label, get in (("split sha256", lambda x: x.dataset.get("split_sha256")),
                               ("protocol version", lambda x: x.protocol["version"]),
                               ("backbone weights", lambda x: x.protocol.get("weights_sha256", {}))):
                if get(r) != get(first):
                    raise ValueError(f"cannot merge {key}: {r.path.name} has {label} {get(r)!r} but "
                                     f"{first.path.name} has {get(first)!r}")
    return dict(groups)


@dataclass
class Row:
    """One method row of a table: its records, one per training seed."""

    name: str
    records: list[Record]
    # per_seed's results by (metric, scope): a table asks for each several times (means, intervals, tests)
    _per_seed: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def seeds(self) -> list[int]:
        return sorted(r.seed for r in self.records)

    def per_seed(self, metric: str, scope: str | None) -> tuple[pd.Series, ...]:
        """Per training seed, the metric's slice values (NaN-free, indexed by ``slice_id``) in ``scope``; the
        row's own series, shared by every caller: read them, never modify them in place."""
        key = (metric, scope)
        if key not in self._per_seed:
            out = []
            for r in sorted(self.records, key=lambda r: r.seed):
                rows = [s for s in r.slices if scope is None or s["category"] == scope]
                out.append(pd.Series({s["slice_id"]: s.get(metric) for s in rows}, dtype=float).dropna().sort_index())
            self._per_seed[key] = tuple(out)
        return self._per_seed[key]

    def values(self, metric: str, scope: str | None = None) -> pd.Series:
        """The metric's slice values averaged over the training seeds (slices every seed has). For a one-seed row
        this is the row's own series (``per_seed``): read it, never modify it in place."""
        seeds = self.per_seed(metric, scope)
        return pd.concat(seeds, axis=1, join="inner").mean(axis=1) if len(seeds) > 1 else seeds[0]

    def seed_means(self, metric: str, scope: str | None = None) -> np.ndarray:
        return np.array([float(v.mean()) for v in self.per_seed(metric, scope)])

    def set_values(self, metric: str) -> np.ndarray:
        return np.array([float(r.metrics["set"][metric]) for r in self.records])

    @property
    def flagged_weights(self) -> bool:
        """The row uses a random or stand-in backbone (its numbers are not the published method's)."""
        w = self.records[0].method.get("weights", {})
        return any(str(v) == "random" or str(v).startswith("stand-in") for v in w.values())


def _rows(records: list[Record]) -> list[Row]:
    by_name: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        by_name[r.method["name"]].append(r)
    names = sorted(by_name, key=lambda n: (n not in _ORDER_FIRST, _ORDER_FIRST.index(n) if n in _ORDER_FIRST else 0,
                                            n))
    return [Row(n, by_name[n]) for n in names]


def _best(rows: list[Row], means: dict[str, float], seed_values: dict[str, np.ndarray], higher: bool) -> str | None:
    """The best row, if it is best across seeds and not tied with every other row; else None."""
    finite = {n: m for n, m in means.items() if np.isfinite(m)}
    if len(finite) < 2 or len(set(np.round(list(finite.values()), 12))) == 1:
        return None
    best = max(finite, key=finite.get) if higher else min(finite, key=finite.get)
    worst_of_best = seed_values[best].min() if higher else seed_values[best].max()
    for n in finite:
        if n == best:
            continue
        best_of_other = seed_values[n].max() if higher else seed_values[n].min()
        if (worst_of_best <= best_of_other) if higher else (worst_of_best >= best_of_other):
            return None
    return best


def _table(records: list[Record], scope: str | None = None) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame,
                                                                     list[dict]]:
    """(display table, numeric table, Wilcoxon table, metric specs shown) for overall (``scope=None``) or one
    category."""
    specs = records[0].metric_specs
    rows = [r for r in _rows(records) if scope is None or any(scope in x.metrics["per_category"] for x in r.records)]
    index = [r.name for r in rows]
    numeric, pvalues, display = (pd.DataFrame(index=index) for _ in range(3))
    shown = []
    for spec in specs:
        m, digits, higher = spec["name"], spec["digits"], spec["higher_is_better"]
        col = f"{m} {'↑' if higher else '↓'}"
        if spec["level"] == "set":
            if scope is not None:
                continue
            means = {r.name: float(r.set_values(m).mean()) for r in rows}
            best = _best(rows, means, {r.name: r.set_values(m) for r in rows}, higher)
            numeric[m] = [means[n] for n in index]
            cells = []
            for r in rows:
                cell = f"{means[r.name]:.{digits}f}"
                cell = f"**{cell}**" if r.name == best else cell
                if len(r.records) > 1:
                    cell += f"; seeds ± {r.set_values(m).std(ddof=0):.{digits}f}"
                cells.append(cell)
            display[col] = cells
            shown.append(spec)
            continue
        values = {r.name: r.values(m, scope) for r in rows}
        if all(v.empty for v in values.values()):  # undefined in this scope
            continue
        means = {n: float(v.mean()) if not v.empty else float("nan") for n, v in values.items()}
        best = _best(rows, means, {r.name: r.seed_means(m, scope) for r in rows}, higher)
        reference = best or (max if higher else min)((n for n in index if np.isfinite(means[n])), key=means.get)
        numeric[m] = [means[n] for n in index]
        numeric[f"{m}_std"] = [float(values[n].std(ddof=0)) for n in index]
        cis = [bootstrap_ci(values[n].to_numpy()) for n in index]
        numeric[f"{m}_ci_low"], numeric[f"{m}_ci_high"] = [c[0] for c in cis], [c[1] for c in cis]
        numeric[f"{m}_seed_std"] = [float(r.seed_means(m, scope).std(ddof=0)) for r in rows]
        pvalues[m] = [float("nan") if n == reference else
                      paired_wilcoxon(*values[n].align(values[reference], join="inner")) for n in index]
        cells = []
        for r, (lo, hi) in zip(rows, cis, strict=True):
            v = values[r.name]
            cell = f"{means[r.name]:.{digits}f} ± {v.std(ddof=0):.{digits}f}"
            cell = f"**{cell}**" if r.name == best else cell
            cell += f" [{lo:.{digits}f}, {hi:.{digits}f}]"
            if len(r.records) > 1:
                cell += f"; seeds ± {r.seed_means(m, scope).std(ddof=0):.{digits}f}"
            cells.append(cell)
        display[col] = cells
        shown.append(spec)
    numeric["seeds"] = display["seeds"] = [len(r.records) for r in rows]
    numeric["s/slice"] = [float(r.values("seconds", scope).mean()) for r in rows]
    display["s/slice"] = [f"{v:.3f}" for v in numeric["s/slice"]]
    display.index = [f"{r.name}†" if r.flagged_weights else r.name for r in rows]
    for df in (display, numeric, pvalues):
        df.index.name = "method"
    return display, numeric, pvalues, shown


def _markdown(df: pd.DataFrame) -> str:
    cols = [df.index.name or "", *df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join([str(i), *[str(v) for v in row]]) + " |" for i, row in zip(df.index, df.values,
                                                                                          strict=True)]
    return "\n".join(lines) + "\n"


def _pvalue_markdown(pvalues: pd.DataFrame) -> str:
    return _markdown(pvalues.map(lambda p: "reference" if np.isnan(p) else f"{p:.3g}"))


def paper_table_markdown(table: PaperTable, dataset: str, records: list[Record]) -> str | None:
    """The paper-vs-ours table of ``table`` from one (dataset, ``table.protocol``)'s records, or None when none of
    its rows has a record. Ours: mean over slices (and training seeds) [95 % bootstrap interval]; a set-level
    metric (one value per record, e.g. PI_q) is its mean over training seeds."""
    rows = {r.name: r for r in _rows(records)}
    present = [(name, label) for name, label in table.rows if name in rows]
    if not present:
        return None
    specs = {s["name"]: s for s in records[0].metric_specs}
    metrics = list(next(iter(table.values.values())))
    lines = [f"### {dataset} / {table.name} ({table.protocol})\n",
             f"{table.source}. Ours: mean ± std over slices [95 % bootstrap interval] (averaged over training seeds "
             "where a row has several); the paper's value beside."
             + (f" {table.note}." if table.note else "") + "\n",
             "| row | method | seeds | " + " | ".join(
                 f"{m} {'↑' if specs[m]['higher_is_better'] else '↓'} | paper {m}" for m in metrics) + " |",
             "|---|---|---|" + "---|---|" * len(metrics)]
    means = {}
    for name, label in present:
        cells = []
        for m in metrics:
            d = specs[m]["digits"]
            paper = table.values.get(label, {}).get(m)
            if specs[m]["level"] == "set":  # one value per record (PI_q, FID): the mean over training seeds
                cells.append(f"{rows[name].set_values(m).mean():.{d}f}")
            else:
                v = rows[name].values(m)
                lo, hi = bootstrap_ci(v.to_numpy())
                cells.append(f"{v.mean():.{d}f} ± {v.std(ddof=0):.{d}f} [{lo:.{d}f}, {hi:.{d}f}]")
            cells.append("—" if paper is None else f"{paper:.{d}f}")
        if table.order_metric:
            order = table.order_metric
            means[label] = float(rows[name].set_values(order).mean() if specs[order]["level"] == "set"
                                 else rows[name].values(order).mean())
        lines.append(f"| {label} | {name} | {len(rows[name].records)} | " + " | ".join(cells) + " |")
    if table.order_metric and len(present) == len(table.rows):
        labels = [label for _, label in table.rows]
        higher = specs[table.order_metric]["higher_is_better"]
        paper_order = sorted(labels, key=lambda lb: table.values[lb][table.order_metric], reverse=higher)
        ours_order = sorted(labels, key=means.get, reverse=higher)
        word = " > " if higher else " < "
        verdict = "holds" if paper_order == ours_order else "does not hold"
        lines.append(f"\nBest to worst by {table.order_metric}: paper {word.join(paper_order)}; ours "
                     f"{word.join(ours_order)}. The paper's order **{verdict}** here.")
    return "\n".join(lines) + "\n"


def _bar_chart(numeric: pd.DataFrame, specs: list[dict], title: str, path: Path) -> None:
    """One horizontal bar chart per plotted slice metric: rows sorted best first, 95 % interval as whiskers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plotted = [s for s in specs if s["level"] == "slice" and s.get("figure", True)]
    if not plotted:
        return
    from matplotlib.ticker import MaxNLocator

    n = len(numeric.index)
    # each panel: its row names (about 0.075 in per character at 8 pt) beside a 2.8 in wide plot
    label_in = 0.075 * max(len(str(name)) for name in numeric.index)
    fig, axes = plt.subplots(1, len(plotted), figsize=((label_in + 2.8) * len(plotted), 0.9 + 0.32 * n),
                             squeeze=False)
    for ax, spec in zip(axes[0], plotted, strict=True):
        m = spec["name"]
        order = numeric[m].sort_values(ascending=not spec["higher_is_better"]).index[::-1]
        mean = numeric.loc[order, m]
        err = np.vstack([(mean - numeric.loc[order, f"{m}_ci_low"]).clip(lower=0),
                         (numeric.loc[order, f"{m}_ci_high"] - mean).clip(lower=0)])
        ax.barh(range(len(order)), mean, xerr=err, color="tab:blue", ecolor="black", capsize=2)
        ax.set_yticks(range(len(order)), order, fontsize=8)
        lo = float(numeric.loc[order, f"{m}_ci_low"].min())
        hi = float(numeric.loc[order, f"{m}_ci_high"].max())
        pad = 0.05 * (hi - lo if hi > lo else abs(hi) + 1e-9)
        ax.set_xlim(lo - pad, hi + pad)
        unit = f" ({spec['unit']})" if spec["unit"] else ""
        ax.set_title(f"{m}{unit}, {'higher' if spec['higher_is_better'] else 'lower'} is better", fontsize=9)
        ax.xaxis.set_major_locator(MaxNLocator(nbins=4))  # wide tick labels (40000, 0.0025) must not overlap
        ax.tick_params(axis="x", labelsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)


def _panel(results: Path, dataset: str, methods: list[str], path: Path) -> bool:
    """Input, each method, target; absolute error maps underneath (display window [-500, 1300] HU)."""
    examples = {m: results / f"{dataset}__{m}__example.npz" for m in methods}
    examples = {m: np.load(p) for m, p in examples.items() if p.is_file()}
    if not examples:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = next(iter(examples.values()))
    same = {m: e for m, e in examples.items() if str(e["slice_id"]) == str(first["slice_id"])}
    cols = [("input", first["ma_image"])] + [(m, e["prediction"]) for m, e in same.items()] + \
        [("target", first["gt_image"])]
    gt = first["gt_image"].astype(np.float32)
    fig, axes = plt.subplots(2, len(cols), figsize=(2.2 * len(cols), 4.6))
    for j, (name, img) in enumerate(cols):
        img = img.astype(np.float32)
        axes[0, j].imshow(np.clip(img, -500, 1300), cmap="gray", vmin=-500, vmax=1300)
        axes[0, j].set_title(name, fontsize=8)
        axes[1, j].imshow(np.abs(img - gt), cmap="inferno", vmin=0, vmax=300)
        for a in axes[:, j]:
            a.axis("off")
    fig.suptitle(f"{dataset}: slice {first['slice_id']} (top: [-500, 1300] HU; bottom: |error| 0-300 HU)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)
    return True


def _caption(dataset: str, protocol: str, rs: list[Record], rows: list[Row]) -> str:
    r0 = rs[0]
    caption = (f"**{dataset}**, protocol `{protocol}` v{r0.protocol['version']}, {r0.dataset['slices']} slices, "
               f"split sha256 `{str(r0.dataset['split_sha256'])[:12]}`; mean ± std over slices [95 % bootstrap "
               "interval of the mean]; rows trained with several seeds are averaged over them and add '; seeds ± "
               "s' (std of the per-seed means); bold: best, where it holds across seeds.\n\n")
    weights = r0.protocol.get("weights_sha256", {})
    if weights:
        caption += ("Backbone weights: " + ", ".join(f"{k} `{v[:12]}`" for k, v in sorted(weights.items()))
                    + ("; **random backbones: these values test the pipeline and are not comparable with "
                       "published FID/LPIPS**" if "random" in weights.values() else "") + ".\n\n")
    flagged = [r.name for r in rows if r.flagged_weights]
    if flagged:
        caption += ("† a random or stand-in backbone (see the record's method weights): the row measures the "
                    "pipeline, not the published model.\n\n")
    return caption


def _paper_tables() -> list[PaperTable]:
    seen: dict[str, PaperTable] = {}
    for _, cls in METHODS.items():
        for t in cls.paper_tables:
            seen.setdefault(t.name, t)
    return [seen[k] for k in sorted(seen)]


def build_leaderboards(root: str | os.PathLike = "leaderboards", figures: bool = True) -> list[Path]:
    """Rebuild every table (and, with ``figures``, the charts, panels and ``index.html``) from
    ``<root>/results/*.json``; returns the written paths.

    Raises:
        ValueError: an unreadable record or records that cannot be merged.
    """
    root = Path(root)
    records = [read_record(path) for path in sorted((root / "results").glob("*.json"))]
    written: list[Path] = []
    sections = []
    paper_tables = _paper_tables()
    for (dataset, protocol), rs in sorted(merge_records(records).items()):
        stem = TABLE_NAME.format(dataset=dataset, protocol=protocol)
        display, numeric, pvalues, shown = _table(rs)
        categories = sorted({c for r in rs for c in r.metrics["per_category"]})
        cat_tables = {c: _table(rs, c) for c in categories}
        per_cat = [f"\n#### {c}\n\n" + _markdown(cat_tables[c][0]) for c in categories]
        md = (f"### {dataset} / {protocol}\n\n" + _caption(dataset, protocol, rs, _rows(rs)) + _markdown(display)
              + "\nPaired Wilcoxon signed-rank p-value against the best row (or the best mean where no row is best "
                "across seeds), same slices:\n\n" + _pvalue_markdown(pvalues)
              + "\n<details><summary>per category</summary>\n" + "".join(per_cat) + "\n</details>\n")
        csv_table = numeric.join(pvalues.add_suffix("_p_vs_best"))
        for path, text in ((root / f"{stem}.md", md), (root / f"{stem}.csv", csv_table.to_csv(float_format="%.6g"))):
            atomic_write(path, text)
            written.append(path)
        sections.append((dataset, protocol, rs, [(None, display, numeric)]
                         + [(c, t[0], t[1]) for c, t in cat_tables.items()]))
        for table in paper_tables:
            if table.protocol != protocol:
                continue
            text = paper_table_markdown(table, dataset, rs)
            if text is not None:
                path = root / f"{dataset}__{table.name}.md"
                atomic_write(path, text)
                written.append(path)
        if figures:
            chart = root / "figures" / f"{stem}.png"
            _bar_chart(numeric, shown, f"{dataset} / {protocol}", chart)
            if chart.is_file():
                written.append(chart)
    if figures:
        for dataset in sorted({r.dataset["name"] for r in records}):
            panel = root / "figures" / f"{dataset}__panel.png"
            methods = [row.name for row in _rows([r for r in records if r.dataset["name"] == dataset])]
            if _panel(root / "results", dataset, methods, panel):
                written.append(panel)
        # link only what this build wrote: a stale figure of a dropped table would mislead
        shown_files = set(written)
        tables = []
        for dataset, protocol, rs, views in sections:
            chart = root / "figures" / f"{TABLE_NAME.format(dataset=dataset, protocol=protocol)}.png"
            papers = [root / f"{dataset}__{t.name}.md" for t in paper_tables if t.protocol == protocol]
            tables.append(PageTable(dataset, protocol, _caption(dataset, protocol, rs, _rows(rs)), rs, views,
                                    chart=chart.relative_to(root).as_posix() if chart in shown_files else None,
                                    paper_tables=[p.read_text() for p in papers if p in shown_files]))
        panels = {p.name.removesuffix("__panel.png"): p.relative_to(root).as_posix() for p in written
                  if p.name.endswith("__panel.png")}
        atomic_write(root / "index.html", render_page(tables, panels))
        written.append(root / "index.html")
    return written


def check_leaderboards(root: str | os.PathLike = "leaderboards") -> list[str]:
    """Regenerate the tables from ``<root>/results`` in a temporary folder and compare them with the committed
    ``<root>/*.md`` and ``*.csv``; returns the differences (empty when the committed tables are current)."""
    import shutil

    root = Path(root)
    problems = []
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copytree(root / "results", Path(tmp) / "results")
        build_leaderboards(tmp, figures=False)
        fresh = {p.name: p.read_bytes() for p in Path(tmp).glob("*") if p.suffix in (".md", ".csv")}
    committed = {p.name: p.read_bytes() for p in root.glob("*") if p.suffix in (".md", ".csv")}
    for name in sorted(set(fresh) | set(committed)):
        if name not in committed:
            problems.append(f"{root / name}: missing (regenerated from the records)")
        elif name not in fresh:
            problems.append(f"{root / name}: committed but no record produces it")
        elif fresh[name] != committed[name]:
            problems.append(f"{root / name}: differs from the table regenerated from the records")
    return problems
