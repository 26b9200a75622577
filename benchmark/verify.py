"""``marbench verify RECORD...``: re-run the rows that result records name and compare every metric.

A record's manifest holds everything a row needs to be run again: the resolved LightningCLI configuration (model,
data, trainer with its ``Evaluator``, ``seed_everything``), the data folder's ``manifest.json`` sha256, the split's
sha256, the protocol with its version and the sha256 of its weight files, the method's weight files, the seed and
the package versions. ``verify_records``

1. reads the records and groups them by row (the same configuration but for the evaluator's protocols), so that a
   trainable row is trained once for all its records;
2. refuses, naming what differs, before anything runs, when the data folder's manifest (or, with
   ``check_files``, any file it lists), the split, a protocol's weight files or conventions, or the weight files
   of a method without training are not the record's, or when this code does not define the record's protocol
   version (a record
   of an older version that it still defines, ``get_protocol(name, version)``, is re-run under that version);
3. re-runs each row from its configuration (the evaluator restricted to the records' protocols, writing to a
   temporary folder; ``data_root`` replaces the data folder): ``fit`` with the record's seed if the method is
   trainable, then the test split and, for protocols that score them, the metal sweeps, as the grid runner
   (``marbench grid``) does;
4. compares every value of the new record with the committed one: each slice's metrics and metadata, the overall
   and per-category mean, std and count, the set-level metrics.

Values agree within ``TOLERANCES`` (one table, per metric) or else ``DEFAULT_TOLERANCE``: equal up to float64
round-off (the rows are deterministic: ``seed_everything``, ``trainer.deterministic``, a seeded training order).
The per-slice timings are measurements, not results: they are shown, never compared. Package versions that differ
from the record's are reported (``package_differences``) but do not refuse: they explain a disagreement. So are a
trainable method's weights that differ from the record's after the re-run: ``fit`` may build them from the data
(a pre-training cached by data, split and recipe, as ``gsi-alignment``'s ARVAE or ``lora-editor``'s stand-in
backbone), so they exist only after it, and the trained weights themselves are the re-run's, not the record's.

``main`` is the command: it prints the table (metric, committed, re-run, difference, tolerance, ok) and returns
0 when every value agrees, 1 otherwise, 2 when verification is refused.
"""
from __future__ import annotations

import json
import math
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from marbench.files import library_versions

__all__ = ["Tolerance", "DEFAULT_TOLERANCE", "TOLERANCES", "tolerance_for", "VerifyRow", "VerifyRefused",
           "compare_records", "check_inputs", "package_differences", "verify_records", "format_table", "main"]

EXIT_AGREE, EXIT_DISAGREE, EXIT_REFUSED = 0, 1, 2


@dataclass(frozen=True)
class Tolerance:
    """``|re-run - committed| <= atol + rtol * |committed|``; ``compared=False``: shown, never compared.

    >>> Tolerance(rtol=1e-9).allows(1.0, 1.0 + 1e-12), Tolerance(rtol=1e-9).allows(1.0, 1.001)
    (True, False)
    """

    rtol: float = 0.0
    atol: float = 0.0
    compared: bool = True
    why: str = ""

    def allows(self, committed, rerun) -> bool:
        """Whether two values agree: numbers within the tolerance (NaN/None only with NaN/None), others equal."""
        if not self.compared:
            return True
        a, b = _number(committed), _number(rerun)
        if a is None or b is None:
            return committed == rerun if (a is None and b is None) else False
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        return abs(b - a) <= self.atol + self.rtol * abs(a)

    def __str__(self) -> str:
        if not self.compared:
            return f"not compared ({self.why})" if self.why else "not compared"
        if self.rtol == 0 and self.atol == 0:
            return "exact"
        parts = ([f"rel {self.rtol:g}"] if self.rtol else []) + ([f"abs {self.atol:g}"] if self.atol else [])
        return " + ".join(parts)


# Deterministic rows reproduce every value bit for bit; 1e-9 relative only absorbs the 15-digit rounding of the
# per-slice values in the JSON records (``build_record``), which the means and stds are not subject to.
DEFAULT_TOLERANCE = Tolerance(rtol=1e-9)

# The one table of metrics that do not reproduce exactly, by ``<protocol>/<metric>`` or by metric name (any
# protocol); the reason is printed in the table's tolerance column.
TOLERANCES: dict[str, Tolerance] = {
    "seconds": Tolerance(compared=False, why="wall time"),
    # the Frechet distance's matrix square root runs through threaded LAPACK, whose summation order follows the
    # number of threads
    "perceptual/fid": Tolerance(rtol=1e-6, why="matrix square root"),
    "perceptual/fid_rad": Tolerance(rtol=1e-6, why="matrix square root"),
}


def tolerance_for(protocol: str, metric: str, default: Tolerance = DEFAULT_TOLERANCE) -> Tolerance:
    """The tolerance of ``metric`` under ``protocol``: ``TOLERANCES`` by ``protocol/metric``, then by ``metric``,
    else ``default``.

    >>> str(tolerance_for("aapm-hu", "rmse_hu")), str(tolerance_for("aapm-hu", "seconds"))
    ('rel 1e-09', 'not compared (wall time)')
    """
    return TOLERANCES.get(f"{protocol}/{metric}", TOLERANCES.get(metric, default))


@dataclass(frozen=True)
class VerifyRow:
    """One line of the verification table.

    Attributes:
        record: the record's name (``<dataset>__<method>__<protocol>__seed<seed>.json``).
        metric: metric (or slice metadata) name.
        scope: ``mean``, ``std``, ``n``, ``set``, ``slices`` (the set of slice ids), ``per slice`` or
            ``per category`` (the worst entry, named in ``where``).
        committed, rerun: the values (for a ``per ...`` scope, those of the worst entry).
        difference: ``rerun - committed`` where both are numbers, else ``None``.
        tolerance: the tolerance as text; ok: whether the values agree within it.
        where: the slice or category of a ``per ...`` row's worst entry.
    """

    record: str
    metric: str
    scope: str
    committed: object
    rerun: object
    difference: float | None
    tolerance: str
    ok: bool
    where: str = ""


class VerifyRefused(ValueError):
    """Verification cannot run: a record is unreadable or its inputs (data, split, weights) are not the record's."""


def _number(value) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    return None


def _difference(committed, rerun) -> float | None:
    a, b = _number(committed), _number(rerun)
    return None if a is None or b is None else b - a


def _worst(record: str, metric: str, scope: str, pairs: Iterable[tuple[str, object, object]],
           tol: Tolerance) -> VerifyRow | None:
    """One row for many ``(where, committed, rerun)`` pairs: the first that disagrees, else the largest
    difference; ``None`` for no pairs."""
    worst, worst_key = None, None
    for where, a, b in pairs:
        ok = tol.allows(a, b)
        d = _difference(a, b)
        key = (not ok, abs(d) if d is not None and not math.isnan(d) else 0.0)
        if worst_key is None or key > worst_key:
            worst, worst_key = (where, a, b, d, ok), key
    if worst is None:
        return None
    where, a, b, d, ok = worst
    return VerifyRow(record, metric, scope, a, b, d, str(tol), ok, where)


def compare_records(committed, rerun, default: Tolerance = DEFAULT_TOLERANCE) -> list[VerifyRow]:
    """Compare a re-run record with the committed one, value by value.

    Args:
        committed, rerun: ``marbench.evaluation.records.Record`` of the same row and protocol.
        default: the tolerance of metrics not in ``TOLERANCES``.
    Returns:
        Per slice-level metric: its overall ``mean``, ``std`` and ``n``, its worst ``per category`` and
        ``per slice`` entries; per set-level metric: ``set``; the ``slices`` row when the slice ids differ; a
        ``per slice`` row per metadata column (``protocol.row_keys``) when its values differ.
    """
    name, protocol = committed.name, committed.protocol["name"]
    rows: list[VerifyRow] = []
    exact = Tolerance()
    a_slices = {s["slice_id"]: s for s in committed.slices}
    b_slices = {s["slice_id"]: s for s in rerun.slices}
    if set(a_slices) != set(b_slices):
        only_a, only_b = sorted(set(a_slices) - set(b_slices)), sorted(set(b_slices) - set(a_slices))
        rows.append(VerifyRow(name, "slice_id", "slices", len(a_slices), len(b_slices),
                              float(len(b_slices) - len(a_slices)), "exact", False,
                              f"only committed {only_a[:3]}, only re-run {only_b[:3]}"))
    common = sorted(set(a_slices) & set(b_slices))
    specs = committed.metric_specs
    slice_metrics = [m["name"] for m in specs if m.get("level", "slice") == "slice"] + ["seconds"]
    set_metrics = [m["name"] for m in specs if m.get("level") == "set"]
    meta = sorted({k for s in committed.slices for k in s} - set(slice_metrics) - {"slice_id"})
    for metric in slice_metrics:
        tol = tolerance_for(protocol, metric, default)
        a_all, b_all = committed.metrics["overall"].get(metric, {}), rerun.metrics["overall"].get(metric, {})
        if not tol.compared:  # a measurement (wall time): its mean is shown
            a, b = a_all.get("mean"), b_all.get("mean")
            rows.append(VerifyRow(name, metric, "mean", a, b, _difference(a, b), str(tol), True))
            continue
        for stat in ("mean", "std", "n"):
            a, b = a_all.get(stat), b_all.get(stat)
            t = exact if stat == "n" else tol
            rows.append(VerifyRow(name, metric, stat, a, b, _difference(a, b), str(t), t.allows(a, b)))
        a_cat, b_cat = committed.metrics.get("per_category", {}), rerun.metrics.get("per_category", {})
        pairs = [(f"{c} {stat}", a_cat.get(c, {}).get(metric, {}).get(stat), b_cat.get(c, {}).get(metric, {}).get(stat))
                 for c in sorted(set(a_cat) | set(b_cat)) for stat in ("mean", "std", "n")]
        row = _worst(name, metric, "per category", pairs, tol)
        if row is not None:
            rows.append(row)
        row = _worst(name, metric, "per slice", ((sid, a_slices[sid].get(metric), b_slices[sid].get(metric))
                                                 for sid in common), tol)
        if row is not None:
            rows.append(row)
    for metric in set_metrics:
        tol = tolerance_for(protocol, metric, default)
        a, b = committed.metrics.get("set", {}).get(metric), rerun.metrics.get("set", {}).get(metric)
        rows.append(VerifyRow(name, metric, "set", a, b, _difference(a, b), str(tol), tol.allows(a, b)))
    for key in meta:
        row = _worst(name, key, "per slice", ((sid, a_slices[sid].get(key), b_slices[sid].get(key))
                                              for sid in common), exact)
        if row is not None and not row.ok:
            rows.append(row)
    return rows


def package_differences(record) -> list[str]:
    """The packages whose installed version differs from the record's manifest (``name: recorded -> installed``)."""
    out = []
    recorded_versions = record.manifest.get("packages", {})
    installed_versions = library_versions(sorted(recorded_versions))
    for name, recorded in sorted(recorded_versions.items()):
        installed = installed_versions[name]
        if installed != recorded:
            out.append(f"{name}: {recorded} -> {installed}")
    return out


def _evaluators(config: dict) -> list[dict]:
    callbacks = config.get("trainer", {}).get("callbacks") or []
    if isinstance(callbacks, dict):
        callbacks = [callbacks]
    return [cb for cb in callbacks if isinstance(cb, dict)
            and str(cb.get("class_path", "")).rsplit(".", 1)[-1] == "Evaluator"]


def _row_key(record) -> str:
    """The record's row: its configuration without the evaluator's protocols and output folder."""
    config = json.loads(json.dumps(record.manifest.get("config") or {}))
    for cb in _evaluators(config):
        cb.get("init_args", {}).pop("protocols", None)
        cb.get("init_args", {}).pop("out_dir", None)
    return json.dumps([config, record.seed], sort_keys=True)


def _run_config(record, out_dir: Path, data_root: str | None) -> dict:
    """The record's configuration with the evaluator writing to ``out_dir`` with the record's seed, and
    ``data_root`` (if given) as the data folder.

    Raises:
        VerifyRefused: no configuration, not one ``Evaluator``, or a seed other than the record's.
    """
    config = json.loads(json.dumps(record.manifest.get("config") or {}))
    where = record.path or record.name
    if not config.get("model"):
        raise VerifyRefused(f"{where}: the manifest holds no run configuration (manifest.config.model); "
                            "the row cannot be re-run")
    evaluators = _evaluators(config)
    if len(evaluators) != 1:
        raise VerifyRefused(f"{where}: expected one marbench Evaluator in manifest.config.trainer.callbacks, "
                            f"found {len(evaluators)}")
    seed = config.get("seed_everything")
    if seed != record.seed:
        raise VerifyRefused(f"{where}: the configuration's seed_everything is {seed!r}, the record's seed "
                            f"{record.seed!r}: re-running it would not reproduce the record")
    evaluators[0].setdefault("init_args", {}).update(out_dir=str(out_dir), seed=record.seed)
    if data_root is not None:
        config.setdefault("data", {}).setdefault("init_args", {})["root"] = str(data_root)
    return config


def _conventions(protocol: dict) -> dict:
    """A protocol's definition without its metric declarations and weights (those are checked on their own)."""
    return json.loads(json.dumps({k: v for k, v in protocol.items() if k not in ("metrics", "weights_sha256")}))


def _protocol_entry(protocol) -> dict:
    """A protocol instance as a configuration entry (``class_path`` and its conventions as ``init_args``)."""
    from dataclasses import asdict, fields, is_dataclass

    args = {f.name: (asdict(v) if is_dataclass(v) else v) for f in fields(protocol)
            if f.init and not f.name.startswith("_") and (v := getattr(protocol, f.name)) is not None}
    return {"class_path": f"{type(protocol).__module__}.{type(protocol).__name__}", "init_args": args}


def _select_protocols(records: list, config: dict, cli) -> list:
    """Restrict the configuration's evaluator to the records' protocols, in place; returns the protocols.

    A record made under an older version of a protocol named by its name is re-run under that version
    (``get_protocol(name, version)``), given to the evaluator as a ``class_path`` entry.

    Raises:
        VerifyRefused: the configuration does not name a record's protocol; a record's protocol version is not
            defined by this code; or its conventions differ from the record's at the same version.
    """
    from marbench.evaluation.protocols import get_protocol

    entries = _evaluators(config)[0]["init_args"].get("protocols") or []
    instances = cli.evaluators()[0].protocols
    chosen_entries, chosen = [], []
    for record in records:
        where, name, version = record.path or record.name, record.protocol["name"], record.protocol.get("version")
        found = [i for i, p in enumerate(instances) if p.name == name]
        if not found:
            raise VerifyRefused(f"{where}: the configuration's evaluator has no protocol {name!r} (it has "
                                f"{[p.name for p in instances]})")
        entry, protocol = entries[found[0]], instances[found[0]]
        if protocol.version != version:
            try:
                protocol = get_protocol(name, version=version)
            except KeyError as e:
                raise VerifyRefused(f"{where}: protocol {name!r} version {version!r}: {e.args[0]}; regenerate the "
                                    "record") from None
            entry = _protocol_entry(protocol)
        if _conventions(protocol.to_dict()) != _conventions(record.protocol):
            here, there = _conventions(protocol.to_dict()), _conventions(record.protocol)
            differ = sorted(k for k in set(here) | set(there) if here.get(k) != there.get(k))
            raise VerifyRefused(f"{where}: protocol {name!r} v{version}: this code's conventions differ from the "
                                f"record's in {differ} (record {[there.get(k) for k in differ]}, found "
                                f"{[here.get(k) for k in differ]})")
        if protocol not in chosen:
            chosen_entries.append(entry)
            chosen.append(protocol)
    _evaluators(config)[0]["init_args"]["protocols"] = chosen_entries
    return chosen


def _build(config: dict, path: Path):
    """The CLI of a configuration (written to ``path``), not run.

    Raises:
        VerifyRefused: the configuration no longer parses or instantiates (the message says why).
    """
    from marbench.lightning_cli import build_cli

    path.write_text(json.dumps(config, indent=1))  # JSON is YAML
    try:
        return build_cli(["--config", str(path)], run=False)
    except SystemExit as e:  # jsonargparse reports a bad configuration on stderr and exits
        raise VerifyRefused(f"{path}: the record's configuration does not parse with this code (exit {e.code}; "
                            "the error is printed above)") from None


def check_inputs(records: list, cli, protocols: list, *, check_files: bool = True) -> None:
    """Check, before re-running, that a row's inputs are the records': data manifest (and, with ``check_files``,
    every file it lists), split, protocol weight files, the weight files of a method without training.

    Args:
        records: the row's records (``Record``); cli: the row's ``MarbenchCLI`` (not run); protocols: the
            ``Protocol`` each record is re-run under (``_select_protocols``).
    Raises:
        VerifyRefused: the first difference, with the record, the expected (recorded) and the found digest.
    """
    from marbench.datasets.sweeps import SweepDataModule
    from marbench.files import sha256_file

    dm = cli.datamodule
    root = Path(getattr(dm, "root", ""))
    manifest = root / "manifest.json"
    found_manifest = sha256_file(manifest) if manifest.is_file() else None
    splits: dict[str, str | None] = {}
    for record in records:
        where = record.path or record.name
        expected = record.dataset.get("data_manifest_sha256")
        if found_manifest != expected:
            raise VerifyRefused(f"{where}: data differ: the record's data manifest sha256 is {expected}, "
                                f"{manifest} has {found_manifest if manifest.is_file() else 'no such file'}")
        protocol = next(p for p in protocols if p.name == record.protocol["name"])
        if protocol.data not in splits:
            if protocol.data == "sweeps":
                sweeps = SweepDataModule(root, keys=("metal_mask",))
                sweeps.setup("test")
                splits["sweeps"] = sweeps.split_sha256
            else:
                dm.setup("test")
                splits[protocol.data] = getattr(dm, "split_sha256", None)
        if splits[protocol.data] != record.dataset.get("split_sha256"):
            raise VerifyRefused(f"{where}: split differs: the record's split sha256 is "
                                f"{record.dataset.get('split_sha256')}, {record.dataset.get('split')} under "
                                f"{root} has {splits[protocol.data]}")
        recorded = record.protocol.get("weights_sha256", {})
        for name, sha in protocol.weights_sha256().items():  # data-bound weights (segmenter): after the run
            if recorded.get(name) != sha:
                raise VerifyRefused(f"{where}: weights differ: the record's {name!r} sha256 is "
                                    f"{recorded.get(name)}, this machine's is {sha}")
        if cli.model.card.trainable:  # its weights may come from fit: reported after the re-run
            continue
        found_weights = cli.model.weights_info()
        if record.method.get("weights", {}) != found_weights:
            raise VerifyRefused(f"{where}: method weights differ: the record's are {record.method.get('weights')}, "
                                f"this machine's {found_weights}")
    if check_files and found_manifest is not None:
        listed = json.loads(manifest.read_text()).get("files", {})
        for rel, sha in sorted(listed.items()):
            path = root / rel
            found = sha256_file(path) if path.is_file() else "no such file"
            if found != sha:
                raise VerifyRefused(f"data differ: {manifest} lists {rel} with sha256 {sha}, {path} has {found}")


def verify_records(paths: list[Path], *, data_root: str | None = None, workdir: Path | None = None,
                   check_files: bool = True, default: Tolerance = DEFAULT_TOLERANCE,
                   log=print) -> tuple[list[VerifyRow], bool]:
    """Re-run the rows of result records and compare every value (see the module docstring).

    Args:
        paths: result record files (``leaderboards/results/*.json``).
        data_root: the data folder to run on instead of the configurations' ``data.init_args.root``.
        workdir: where the re-run configurations and records go (default: a temporary folder, removed after).
        check_files: also check every file the data manifest lists against its sha256.
        default: tolerance of metrics not in ``TOLERANCES``.
        log: progress messages (one line per row and per package difference).
    Returns:
        The table rows (``compare_records`` of each record, in the order given) and whether all agree.
    Raises:
        VerifyRefused: a record is unreadable or has no runnable configuration, the data, split or weight files
            are not the record's (checked for every row before any runs), a re-run wrote no record, or the
            re-run used other protocol weights (a segmenter trained here) than the record's.
    """
    import torch

    from marbench.evaluation.records import read_record
    from marbench.row import evaluate_row

    records = []
    for p in paths:
        try:
            records.append(read_record(p))
        except (ValueError, OSError) as e:
            raise VerifyRefused(str(e)) from None
    rows_by_key: dict[str, list] = {}
    for record in records:
        rows_by_key.setdefault(_row_key(record), []).append(record)
    with tempfile.TemporaryDirectory(prefix="marbench-verify-") as tmp:
        work = Path(workdir) if workdir is not None else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        plans = []
        for i, group in enumerate(rows_by_key.values()):
            out = work / f"row{i}"
            config = _run_config(group[0], out, data_root)
            cli = _build(config, work / f"row{i}.yaml")
            protocols = _select_protocols(group, config, cli)
            check_inputs(group, cli, protocols, check_files=check_files)
            plans.append((group, config, out, work / f"row{i}.yaml"))
        for record in records:
            for diff in package_differences(record):
                log(f"note: {record.name}: package version differs from the record's: {diff}")
        reruns: dict[str, object] = {}
        for group, config, out, path in plans:
            log(f"re-running {group[0].method['name']} (seed {group[0].seed}) for "
                f"{', '.join(r.protocol['name'] for r in group)}")
            threads = torch.get_num_threads()
            # the record's CPU thread count: training sums in an order that follows it (older records lack it)
            torch.set_num_threads(group[0].manifest.get("torch_threads") or threads)
            try:
                cli = _build(config, path)  # built again right before running: seeded afresh
                if cli.model.card.trainable:
                    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
                evaluate_row(cli)
            finally:
                torch.set_num_threads(threads)
            for record in group:
                new = out / record.name
                if not new.is_file():
                    raise VerifyRefused(f"{record.path}: the re-run wrote no {new.name} under {out} (it wrote "
                                        f"{sorted(p.name for p in out.glob('*.json'))})")
                rerun = read_record(new)
                if rerun.protocol.get("weights_sha256") != record.protocol.get("weights_sha256"):
                    raise VerifyRefused(f"{record.path}: weights differ: the record's protocol weights are "
                                        f"{record.protocol.get('weights_sha256')}, the re-run's "
                                        f"{rerun.protocol.get('weights_sha256')}")
                if rerun.method.get("weights", {}) != record.method.get("weights", {}):
                    log(f"note: {record.name}: method weights differ from the record's: "
                        f"{record.method.get('weights')} -> {rerun.method.get('weights')}")
                reruns[record.name] = rerun
        rows = [row for record in records for row in compare_records(record, reruns[record.name], default)]
    return rows, all(r.ok for r in rows)


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.10g}"
    return str(value)


def format_table(rows: list[VerifyRow], only_failures: bool = False) -> str:
    """The rows as one Markdown table per record: metric, scope, committed, re-run, difference, tolerance, ok.

    Args:
        only_failures: keep the rows that disagree (a record whose rows all agree gets a one-line summary).
    """
    out: list[str] = []
    for record in dict.fromkeys(r.record for r in rows):
        mine = [r for r in rows if r.record == record]
        bad = sum(not r.ok for r in mine)
        out.append(f"{record}: {'agrees' if not bad else f'{bad} of {len(mine)} values disagree'}")
        shown = [r for r in mine if not r.ok] if only_failures else mine
        if not shown:
            out.append("")
            continue
        out.append("| metric | scope | committed | re-run | difference | tolerance | ok |")
        out.append("|---|---|---|---|---|---|---|")
        for r in shown:
            scope = f"{r.scope} ({r.where})" if r.where else r.scope
            diff = "-" if r.difference is None else f"{r.difference:+.3g}"
            out.append(f"| {r.metric} | {scope} | {_fmt(r.committed)} | {_fmt(r.rerun)} | {diff} | {r.tolerance} | "
                       f"{'yes' if r.ok else 'NO'} |")
        out.append("")
    return "\n".join(out)


def main(paths: list[str | Path], *, data_root: str | None = None, check_files: bool = True,
         only_failures: bool = False, workdir: Path | None = None) -> int:
    """``marbench verify``: verify the records, print the table; returns the exit status.

    Returns:
        0 when every value agrees within its tolerance, 1 when one does not (the table shows which), 2 when
        verification is refused (the reason goes to stderr).
    """
    try:
        rows, ok = verify_records([Path(p) for p in paths], data_root=data_root, workdir=workdir,
                                  check_files=check_files, log=lambda m: print(m, file=sys.stderr))
    except VerifyRefused as e:
        print(f"marbench verify: refused: {e}", file=sys.stderr)
        return EXIT_REFUSED
    print(format_table(rows, only_failures=only_failures))
    n = len({r.record for r in rows})
    print(f"{n} record(s): " + ("every value reproduced within its tolerance" if ok else
                                f"{len({r.record for r in rows if not r.ok})} do not reproduce"))
    return EXIT_AGREE if ok else EXIT_DISAGREE
