"""A self-contained HTML report: config summary, metric tables, embedded figures."""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .calibration import describe_interval
from .files import write_text

STYLE = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 10px;
text-align:right}th{background:#f2f2f2}td:first-child,th:first-child{text-align:left}
img{max-width:100%;border:1px solid #ddd;margin:.5em 0}"""


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return html.escape(str(value))


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(v)}</td>" for v in row) + "</tr>"
                   for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _group_rows(groups: dict[str, dict[str, Any]]) -> list[list[Any]]:
    return [[name, g.get("n", 0), g.get("mae", "-"), g.get("bias", "-"),
             g.get("tolerance_accuracy", "-")] for name, g in groups.items()]


def _extras(metrics: dict[str, Any], tol: float) -> list[str]:
    """Sections for test-time augmentation, ensembles and predictive uncertainty."""
    parts = []
    if "tta" in metrics:
        t = metrics["tta"]
        parts += [f"<h3>Test-time augmentation ({t['views']} views)</h3>",
                  _table(["", "MAE"], [["with TTA", t["mae"]],
                                       ["without TTA (identity view)", t["mae_without_tta"]]])]
    if "ensemble" in metrics:
        members = metrics["ensemble"]["members"]
        parts += [f"<h3>Ensemble of {len(members)} models</h3>",
                  _table(["model", "MAE", "RMSE", "R²", f"±{tol:g} mo accuracy"],
                         [[m["model"], m["mae"], m["rmse"], m["r2"], m["tolerance_accuracy"]]
                          for m in members]
                         + [["ensemble (mean)", metrics["mae"], metrics["rmse"],
                             metrics["r2"], metrics["tolerance_accuracy"]]])]
    if "uncertainty" in metrics:
        u = metrics["uncertainty"]
        parts += ["<h3>Uncertainty</h3>",
                  (f"<p>Per-image standard deviation from {html.escape(u['source'])}; "
                  f"interval = prediction ± 1.645 std. On these images the intervals are "
                  f"<b>{html.escape(u['verdict'])}</b>: to cover {u['level']:.0%} they "
                  f"would need to be {u['scale_for_nominal']:.2f} times as wide.</p>"),
                  _table([f"{u['level']:.0%} coverage", "mean width (months)", "mean std",
                          "corr(|error|, std)"],
                         [[u["coverage"], u["mean_width"], u["mean_std"],
                           "-" if u["error_std_correlation"] is None
                           else u["error_std_correlation"]]])]
    if "recalibration" in metrics:
        r = metrics["recalibration"]
        fit, iv = r["fit"], r["interval"]
        fitted_on = fit.get("fitted_on", "validation split")
        parts += [f"<h3>Recalibration (fitted on the {fitted_on})</h3>",
                  (f"<p>corrected = {fit['intercept']:.2f} + {fit['slope']:.3f} × predicted; "
                   f"split-conformal ({iv['kind']}) {html.escape(describe_interval(fit))}, "
                   f"fitted on {fit['n']} images of the {fitted_on}.</p>"),
                  _table(["", "MAE", f"±{tol:g} mo accuracy", "slope (pred on true)"]
                         + [f"bias {g}" for g in r["before"]["bias_by_age_group"]],
                         [[name, r[key]["mae"], r[key]["tolerance_accuracy"],
                           r[key]["regression_to_mean"]["slope"],
                           *[b if b is not None else "-"
                             for b in r[key]["bias_by_age_group"].values()]]
                          for name, key in (("before", "before"), ("after", "after"))]),
                  _table(["interval", "coverage", "mean width (months)"],
                         [["all", iv["coverage"], iv["mean_width"]]]
                         + [[g, v.get("coverage", f"n={v['n']}"), v.get("mean_width", "-")]
                            for g, v in iv["by_age_group"].items()])]
    return parts


def _bias_table(rows: list[dict[str, Any]]) -> list[str]:
    """Each variant's mean bias (predicted - true) per age group, or nothing."""
    groups = list(rows[0].get("bias_by_age_group", {})) if rows else []
    if not groups:
        return []
    cells = [[r["variant"], *("-" if r["bias_by_age_group"].get(g) is None
                              else r["bias_by_age_group"][g] for g in groups)]
             for r in rows]
    return ["<h2>Bias by age group (predicted - true, months)</h2>",
            _table(["variant", *groups], cells)]


def write_benchmark_report(out_dir: Path, summary: dict[str, Any],
                           figures: Sequence[Path]) -> Path:
    """``report.html`` of a benchmark: the table, the paired comparisons, the curves."""
    note = summary.get("held_out_note")
    rows = [[r["variant"], r["n"], r["mae"], r["rmse"], r["r2"], r["tolerance_accuracy"],
             r["bias"], r["slope"], r["epochs"], "-" if r["train_minutes"] is None
             else r["train_minutes"]] for r in summary["rows"]]
    comparisons = [[f"{c['b']} - {c['a']}", c["n"], c["difference"],
                    f"[{c['ci_low']:.2f}, {c['ci_high']:.2f}]", c["fraction_b_worse"]]
                   for c in summary["comparisons"]]
    parts = ["<h1>Benchmark</h1>",
             f"<p>Held out: the {html.escape(summary['held_out_split'])} split, "
             f"{summary['n_held_out']} images; predicting the training mean gives MAE "
             f"{summary['mean_baseline_mae']:.2f} months."
             + (f" <b>{html.escape(note)}</b>" if note else "") + "</p>",
             _table(["variant", "n", "MAE", "RMSE", "R²", "±12 mo accuracy", "bias",
                     "slope (pred on true)", "epochs", "minutes"], rows),
             *_bias_table(summary["rows"]),
             "<h2>Paired bootstrap against the first variant (MAE difference, months)</h2>",
             _table(["B - A", "n", "difference", "95% CI", "fraction B worse"], comparisons)]
    for figure in figures:
        data = base64.b64encode(Path(figure).read_bytes()).decode("ascii")
        parts.append(f'<img alt="{html.escape(Path(figure).stem)}" '
                     f'src="data:image/png;base64,{data}">')
    page = ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>Benchmark</title>"
            f"<style>{STYLE}</style></head><body>{''.join(parts)}</body></html>")
    path = out_dir / "report.html"
    write_text(path, page)
    return path


def write_report(out_dir: Path, metrics: dict[str, Any], figures: Sequence[Path],
                 config_summary: dict[str, Any]) -> Path:
    """Write ``report.html`` into ``out_dir`` with every figure inlined as PNG data."""
    tol = metrics["tolerance_months"]
    parts = [f"<h1>Bone-age evaluation: {html.escape(str(metrics.get('title', '')))}</h1>",
             *([f"<p class='note'><b>Images:</b> {html.escape(metrics['split_note'])}</p>"]
               if "split_note" in metrics else []),
             "<h2>Configuration</h2>",
             _table(["key", "value"], list(config_summary.items())),
             "<h2>Metrics (months)</h2>",
             _table(["n", "MAE", "RMSE", "R²", "bias (pred - true)", f"±{tol:g} mo accuracy"],
                    [[metrics["n"], metrics["mae"], metrics["rmse"], metrics["r2"],
                      metrics["bias"], metrics["tolerance_accuracy"]]]),
             _table(["tolerance (months)", "accuracy"],
                    [[k, v] for k, v in metrics["accuracy_at"].items()]),
             (f"<p>Regression to the mean: predicted = "
              f"{metrics['regression_to_mean']['intercept']:.1f} + "
              f"{metrics['regression_to_mean']['slope']:.3f} × true (1 would be none; "
              "below 1, young ages come out too old and old ones too young).</p>"
              if "regression_to_mean" in metrics else ""),
             "<h3>By age group</h3>",
             _table(["age group (months)", "n", "MAE", "bias", f"±{tol:g} mo accuracy"],
                    _group_rows(metrics["by_age_group"])),
             "<h3>By sex</h3>",
             _table(["sex", "n", "MAE", "bias", f"±{tol:g} mo accuracy"],
                    _group_rows(metrics["by_sex"])),
             *_extras(metrics, tol),
             "<h2>Figures</h2>"]
    for figure in figures:
        data = base64.b64encode(Path(figure).read_bytes()).decode("ascii")
        parts.append(f"<h3>{html.escape(Path(figure).stem.replace('_', ' '))}</h3>"
                     f'<img alt="{html.escape(Path(figure).stem)}" '
                     f'src="data:image/png;base64,{data}">')
    page = ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>Bone-age report"
            f"</title><style>{STYLE}</style></head><body>{''.join(parts)}</body></html>")
    path = out_dir / "report.html"
    write_text(path, page)
    return path
