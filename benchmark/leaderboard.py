"""Leaderboards: merge result records into tables and figures under ``leaderboards/``.

For every (dataset, protocol) the records of all methods (and seeds) are merged into one table: a row per
method, a column per metric ``mean +- std`` over slices, the best value in bold, an arrow for the direction
(higher or lower is better), and the records' split hash and protocol version in the caption. Records whose
split hash or protocol version differ are refused, naming both. Also: per-category tables, a bar chart per
metric, a qualitative panel (input, each method, target, absolute error maps underneath; Emirdagi et al.
Fig. 2 style), ablation tables (a method's variants beside the paper's numbers, ``ABLATIONS``) and
``index.html``. Every file is written to a temporary name and renamed.
"""
from __future__ import annotations

import html
import os
import tempfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from marbench.evaluation.records import read_record
from marbench.evaluation.statistics import bootstrap_ci, paired_wilcoxon
from marbench.files import atomic_write

__all__ = ["build_leaderboards", "check_leaderboards", "merge_records", "TABLE_NAME", "Ablation", "ABLATIONS"]

TABLE_NAME = "{dataset}__{protocol}"
_ORDER_FIRST = ("uncorrected",)


@dataclass(frozen=True)
class Ablation:
    """An ablation table: a method's variant rows (record method names, in the paper's order) on one protocol,
    beside the numbers the paper reports for them."""

    name: str
    source: str
    protocol: str
    rows: tuple[tuple[str, str], ...]  # (record method name, the paper's row label)
    paper: dict[str, dict[str, float]]  # row label -> metric -> value
    order_metric: str  # the metric whose order across rows the paper reports

    def markdown(self, dataset: str, records: dict[str, dict]) -> str | None:
        """The table for ``records`` (method name -> record of ``self.protocol``), or None without any row."""
        present = [(m, label) for m, label in self.rows if m in records]
        if not present:
            return None
        metrics = list(next(iter(self.paper.values())))
        directions = records[present[0][0]]["protocol"]["directions"]
        lines = [f"### {dataset} / {self.name} ablation ({self.protocol})\n", f"{self.source}; ours: mean ± std "
                 "over slices [95 % bootstrap interval], the paper's value beside.\n",
                 "| row | method | " + " | ".join(f"{m} {'↑' if directions[m] else '↓'} | paper {m}" for m in metrics)
                 + " |", "|---|---|" + "---|---|" * len(metrics)]
        means = {}
        for method, label in present:
            cells = []
            for m in metrics:
                v = _slice_values(records[method], m, None)
                lo, hi = bootstrap_ci(v.to_numpy())
                digits = 4 if any(k in m for k in ("ssim", "lp", "miou")) else 2
                cells += [f"{v.mean():.{digits}f} ± {v.std(ddof=0):.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]",
                          f"{self.paper[label][m]:.{digits}f}"]
            means[label] = float(_slice_values(records[method], self.order_metric, None).mean())
            lines.append(f"| {label} | {method} | " + " | ".join(cells) + " |")
        if len(present) == len(self.rows):
            labels = [label for _, label in self.rows]
            higher = directions[self.order_metric]
            steps = zip(labels, labels[1:], strict=False)
            holds = all(means[b] > means[a] if higher else means[b] < means[a] for a, b in steps)
            relation = (" < " if higher else " > ").join(labels)
            verdict = "holds" if holds else "does not hold"
            lines.append(f"\nThe paper's order ({self.order_metric}: {relation}) **{verdict}** here.")
        return "\n".join(lines) + "\n"


# Yu et al. (paper 004) Table I, DeepLesion simulation: RMSE (HU) and SSIM of the four rows
ABLATIONS = (
    Ablation("sscd", "Yu et al. (paper 004) Table I", "aapm-hu",
             (("sscd-sinonet", "SinoNet"), ("sscd-sinonet-fbpcons", "SinoNet+FBPcons"),
              ("sscd-joint", "JointLearning"), ("sscd-joint-mtr", "JointLearning+MTR")),
             {"SinoNet": {"rmse_hu": 42.60, "ssim": 0.9727}, "SinoNet+FBPcons": {"rmse_hu": 41.97, "ssim": 0.9731},
              "JointLearning": {"rmse_hu": 36.28, "ssim": 0.9755},
              "JointLearning+MTR": {"rmse_hu": 34.20, "ssim": 0.9773}}, "rmse_hu"),
)


def merge_records(records: list[dict]) -> dict[tuple[str, str], list[dict]]:
    """Group records by (dataset, protocol), refusing mixed split hashes or protocol versions.

    Raises:
        ValueError: two records of one (dataset, protocol) with different ``split_sha256`` or protocol
            ``version`` (the message names both records).
    """
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in records:
        groups[(r["dataset"]["name"], r["protocol"]["name"])].append(r)
    for key, rs in groups.items():
        first = rs[0]
        for r in rs[1:]:
            for label, get in (("split sha256", lambda x: x["dataset"].get("split_sha256")),
                               ("protocol version", lambda x: x["protocol"]["version"]),
                               ("backbone weights", lambda x: x["protocol"].get("weights_sha256", {}))):
                if get(r) != get(first):
                    raise ValueError(f"cannot merge {key}: {r['_path']} has {label} {get(r)!r} but "
                                     f"{first['_path']} has {get(first)!r}")
    return dict(groups)


def _method_order(names: list[str]) -> list[str]:
    return sorted(names, key=lambda n: (n not in _ORDER_FIRST, n))


def _slice_values(record: dict, metric: str, scope: str | None) -> pd.Series:
    rows = [r for r in record["slices"] if scope is None or r["category"] == scope]
    # NaN marks a slice where the metric is undefined (a tissue class absent from both label maps): skipped
    return pd.Series({r["slice_id"]: r[metric] for r in rows}, dtype=float).dropna().sort_index()


def _table(records: list[dict], scope: str | None = None) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame,
                                                                   dict[str, bool]]:
    """(display table, numeric table, Wilcoxon table, directions) for overall (``scope=None``) or a category.

    The numeric table has, per metric, the mean, std and 95 % bootstrap interval over slices; the Wilcoxon
    table the paired p-value of each method against the best one on the same slices.
    """
    directions = dict(records[0]["protocol"]["directions"])
    metrics = list(directions)
    by_name = {}
    for r in records:
        if scope is not None and scope not in r["metrics"]["per_category"]:
            continue
        by_name[r["method"]["name"] + ("" if r["seed"] == 0 else f" (seed {r['seed']})")] = r
    order = _method_order(list(by_name))
    numeric = pd.DataFrame(index=order)
    pvalues = pd.DataFrame(index=order)
    display = pd.DataFrame(index=order)
    for m in metrics:
        values = {n: _slice_values(by_name[n], m, scope) for n in order}
        if all(v.empty for v in values.values()):  # undefined in this scope (a tissue class none of it holds)
            continue
        numeric[m] = [float(values[n].mean()) for n in order]
        numeric[f"{m}_std"] = [float(values[n].std(ddof=0)) for n in order]
        cis = [bootstrap_ci(values[n].to_numpy()) for n in order]
        numeric[f"{m}_ci_low"], numeric[f"{m}_ci_high"] = [c[0] for c in cis], [c[1] for c in cis]
        best = numeric[m].idxmax() if directions[m] else numeric[m].idxmin()
        pvalues[m] = [float("nan") if n == best else paired_wilcoxon(*values[n].align(values[best], join="inner"))
                      for n in order]
        digits = 4 if any(k in m for k in ("ssim", "lp", "miou")) else 2
        cells = []
        for n, (lo, hi) in zip(order, cis, strict=True):
            cell = f"{numeric.loc[n, m]:.{digits}f} ± {numeric.loc[n, f'{m}_std']:.{digits}f}"
            cell = f"**{cell}**" if n == best else cell
            cells.append(f"{cell} [{lo:.{digits}f}, {hi:.{digits}f}]")
        display[f"{m} {'↑' if directions[m] else '↓'}"] = cells
    if scope is None:  # set-level metrics (FID) exist for the whole split only
        for m, higher in records[0]["protocol"].get("set_directions", {}).items():
            numeric[m] = [float(by_name[n]["metrics"]["set"][m]) for n in order]
            best = numeric[m].idxmax() if higher else numeric[m].idxmin()
            display[f"{m} {'↑' if higher else '↓'}"] = [f"**{v:.4g}**" if n == best else f"{v:.4g}"
                                                       for n, v in zip(order, numeric[m], strict=True)]
    numeric["s/slice"] = [float(_slice_values(by_name[n], "seconds", scope).mean()) for n in order]
    display["s/slice"] = [f"{v:.3f}" for v in numeric["s/slice"]]
    for df in (display, numeric, pvalues):
        df.index.name = "method"
    return display, numeric, pvalues, directions


def _pvalue_markdown(pvalues: pd.DataFrame) -> str:
    shown = pvalues.map(lambda p: "best" if np.isnan(p) else f"{p:.3g}")
    return _markdown(shown)


def _markdown(df: pd.DataFrame) -> str:
    cols = [df.index.name or "", *df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join([str(i), *[str(v) for v in row]]) + " |" for i, row in zip(df.index, df.values,
                                                                                          strict=True)]
    return "\n".join(lines) + "\n"


def _bar_chart(mean_df: pd.DataFrame, directions: dict[str, bool], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = list(directions)
    fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.2))
    for ax, m in zip(np.atleast_1d(axes), metrics, strict=True):
        ax.bar(mean_df.index, mean_df[m], color="tab:blue")
        ax.set_title(f"{m} ({'higher' if directions[m] else 'lower'} is better)", fontsize=9)
        ax.tick_params(axis="x", rotation=45, labelsize=8)
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


def build_leaderboards(root: str | os.PathLike = "leaderboards", figures: bool = True) -> list[Path]:
    """Rebuild every table (and, with ``figures``, the charts, panels and ``index.html``) from
    ``<root>/results/*.json``; returns the written paths.

    Raises:
        ValueError: an unreadable record or records that cannot be merged.
    """
    root = Path(root)
    records = []
    for path in sorted((root / "results").glob("*.json")):
        r = read_record(path)
        r["_path"] = path.name
        records.append(r)
    written: list[Path] = []
    sections = []
    for (dataset, protocol), rs in sorted(merge_records(records).items()):
        stem = TABLE_NAME.format(dataset=dataset, protocol=protocol)
        display, means, pvalues, directions = _table(rs)
        r0 = rs[0]
        caption = (f"**{dataset}**, protocol `{protocol}` v{r0['protocol']['version']}, "
                   f"{r0['dataset']['slices']} test slices, split sha256 `{str(r0['dataset']['split_sha256'])[:12]}`; "
                   "mean ± std over slices [95 % bootstrap interval of the mean], best in bold.\n\n")
        weights = r0["protocol"].get("weights_sha256", {})
        if weights:
            caption += ("Backbone weights: " + ", ".join(f"{k} `{v[:12]}`" for k, v in sorted(weights.items()))
                        + ("; **random backbones: these values test the pipeline and are not comparable with "
                           "published FID/LPIPS**" if "random" in weights.values() else "") + ".\n\n")
        categories = sorted({c for r in rs for c in r["metrics"]["per_category"]})
        per_cat = []
        for c in categories:
            d, _, _, _ = _table(rs, c)
            per_cat.append(f"\n#### {c}\n\n" + _markdown(d))
        md = (f"### {dataset} / {protocol}\n\n" + caption + _markdown(display)
              + "\nPaired Wilcoxon signed-rank p-value against the best method (same slices):\n\n"
              + _pvalue_markdown(pvalues)
              + "\n<details><summary>per category</summary>\n" + "".join(per_cat) + "\n</details>\n")
        csv_table = means.join(pvalues.add_suffix("_p_vs_best"))
        for path, text in ((root / f"{stem}.md", md), (root / f"{stem}.csv", csv_table.to_csv(float_format="%.6g"))):
            atomic_write(path, text)
            written.append(path)
        sections.append((stem, md, display))
        for ablation in ABLATIONS:
            if protocol != ablation.protocol:
                continue
            table = ablation.markdown(dataset, {r["method"]["name"]: r for r in rs if r["seed"] == 0})
            if table is not None:
                path = root / f"{dataset}__{ablation.name}-ablation.md"
                atomic_write(path, table)
                written.append(path)
        if figures:
            chart = root / "figures" / f"{stem}.png"
            _bar_chart(means, directions, f"{dataset} / {protocol}", chart)
            written.append(chart)
    if figures:
        for dataset in sorted({r["dataset"]["name"] for r in records}):
            panel = root / "figures" / f"{dataset}__panel.png"
            methods = _method_order(sorted({r["method"]["name"] for r in records if r["dataset"]["name"] == dataset}))
            if _panel(root / "results", dataset, methods, panel):
                written.append(panel)
        body = "".join(f"<h2>{html.escape(stem)}</h2>{d.to_html(escape=True)}"
                       f"<img src='figures/{html.escape(stem)}.png'>" for stem, _, d in sections)
        page = f"<!doctype html><meta charset='utf-8'><title>marbench leaderboard</title><h1>marbench</h1>{body}"
        atomic_write(root / "index.html", page)
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
