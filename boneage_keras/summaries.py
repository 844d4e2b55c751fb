"""The plain text the command line prints: one function per command's result, each
returning lines (no printing, no Keras), so the CLI only parses, calls and echoes.

    >>> print(metrics_summary(evaluate_run(["runs/NAME"]).metrics))
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from .calibration import describe_interval


def train_summary(run_dir: Any, best_epoch: int, best: dict[str, float],
                  process: str | None = None) -> str:
    """Where the run is and the validation figures of the epoch in best.keras;
    ``process`` prefixes each line in a run of several processes."""
    who = f"[{process}] " if process else ""
    figures = ", ".join(f"{k}={v:.4f}" for k, v in best.items())
    return (f"{who}run directory: {run_dir}\n"
            f"{who}best epoch {best_epoch} (in best.keras): {figures}")


def calibration_summary(run_dir: Any, calibration: dict[str, Any]) -> str:
    """The calibration fitted at the end of training, in one line."""
    return (f"calibration ({calibration['fitted_on']}, {calibration['n']} images): "
            f"corrected = {calibration['intercept']:+.2f} + {calibration['slope']:.3f} x "
            f"predicted, {describe_interval(calibration)}; in "
            f"{run_dir}/calibration.json, used by `predict --recalibrate`")


def _group_rows(metrics: dict[str, Any]) -> list[str]:
    lines = [f"{'group':<10}{'n':>6}{'MAE':>9}{'bias':>9}{'acc':>8}"]
    for section in ("by_age_group", "by_sex"):
        for name, g in metrics[section].items():
            if g.get("n"):
                lines.append(f"{name:<10}{g['n']:>6}{g['mae']:>9.2f}{g['bias']:>+9.2f}"
                             f"{g['tolerance_accuracy']:>8.3f}")
            else:
                lines.append(f"{name:<10}{0:>6}")
    return lines


def metrics_summary(metrics: dict[str, Any]) -> str:
    """``metrics.json`` as a few lines: overall, per group, TTA, members, calibration."""
    tol = metrics["tolerance_months"]
    lines = [f"images: {metrics['split_note']}"] if "split_note" in metrics else []
    lines.append(f"n={metrics['n']}  MAE={metrics['mae']:.2f}  RMSE={metrics['rmse']:.2f}  "
                 f"R2={metrics['r2']:.3f}  bias={metrics['bias']:+.2f}  "
                 f"acc(+-{tol:g})={metrics['tolerance_accuracy']:.3f}")
    lines.append("accuracy at " + ", ".join(f"+-{k}: {v:.3f}"
                                            for k, v in metrics["accuracy_at"].items()))
    lines += _group_rows(metrics)
    if "tta" in metrics:
        t = metrics["tta"]
        lines.append(f"TTA ({t['views']} views): MAE {t['mae']:.2f}, without TTA "
                     f"{t['mae_without_tta']:.2f}")
    for member in metrics.get("ensemble", {}).get("members", []):
        lines.append(f"member {member['model']}: MAE {member['mae']:.2f}  "
                     f"acc(+-{tol:g})={member['tolerance_accuracy']:.3f}")
    if "recalibration" in metrics:
        r = metrics["recalibration"]
        iv = r["interval"]
        lines.append(f"recalibrated (fitted on the {r['fit'].get('fitted_on', 'validation split')}): MAE {r['before']['mae']:.2f} -> "
                     f"{r['after']['mae']:.2f}, slope of predicted on true "
                     f"{r['before']['regression_to_mean']['slope']:.3f} -> "
                     f"{r['after']['regression_to_mean']['slope']:.3f}; {iv['level']:.0%} "
                     f"conformal interval covers {iv['coverage']:.1%}, mean width "
                     f"{iv['mean_width']:.1f} months")
    if "uncertainty" in metrics:
        u = metrics["uncertainty"]
        lines.append(f"{u['level']:.0%} interval ({u['source']}): coverage "
                     f"{u['coverage']:.1%}, mean width {u['mean_width']:.1f} months: "
                     f"{u['verdict']}")
    return "\n".join(lines)


def _ids(ids: list[str], most: int) -> str:
    return ", ".join(ids[:most]) + (" ..." if len(ids) > most else "")


def prediction_failures(table: pd.DataFrame, output: str | None) -> str | None:
    """The one error line for images that could not be read, or None."""
    if "error" not in table:
        return None
    failed = table.loc[table["error"] != "", "id"].astype(str).tolist()
    return (f"error: {len(failed)} of {len(table)} images could not be read ("
            f"{_ids(failed, 5)}); the others were predicted. See the error column"
            + (f" of {output}." if output else "."))


def comparison_summary(result: dict[str, Any]) -> str:
    """``compare``'s result: overall and per age group, and ids left out."""
    o = result["overall"]
    pct = round(o["confidence"] * 100)
    lines = [f"A: {result['a']}", f"B: {result['b']}",
             (f"n={o['n']}  MAE A={o['mae_a']:.2f}  MAE B={o['mae_b']:.2f}  "
             f"B-A={o['difference']:+.2f}  {pct}% CI [{o['ci_low']:+.2f}, "
             f"{o['ci_high']:+.2f}]  ({o['n_resamples']} resamples, seed {o['seed']})")]
    for name, g in result["by_age_group"].items():
        if "difference" in g:
            lines.append(f"  {name:<8} n={g['n']:<5} B-A={g['difference']:+.2f}  CI "
                         f"[{g['ci_low']:+.2f}, {g['ci_high']:+.2f}]")
        else:
            lines.append(f"  {name:<8} n={g['n']:<5} too few to compare")
    for side in ("a", "b"):
        ids = result[f"only_in_{side}"]
        if ids:
            lines.append(f"{len(ids)} id(s) only in {side.upper()}, left out: "
                         + _ids(ids, 10))
    return "\n".join(lines)


def benchmark_summary(result: dict[str, Any], out_dir: Any) -> str:
    """``benchmark``'s table and its paired comparisons."""
    note = f" ({result['held_out_note']})" if result["held_out_note"] else ""
    lines = [(f"held out: {result['held_out_split']} split, n={result['n_held_out']}{note}; "
             f"predicting the training mean gives MAE {result['mean_baseline_mae']:.2f} "
             "months"),
             (f"{'variant':<22}{'MAE':>7}{'RMSE':>7}{'R2':>7}{'acc+-12':>9}{'bias':>7}"
             f"{'slope':>7}{'epochs':>7}{'min':>7}")]
    for r in result["rows"]:
        minutes = "-" if r["train_minutes"] is None else f"{r['train_minutes']:.1f}"
        lines.append(f"{r['variant']:<22}{r['mae']:>7.2f}{r['rmse']:>7.2f}{r['r2']:>7.3f}"
                     f"{r['tolerance_accuracy']:>9.3f}{r['bias']:>+7.2f}{r['slope']:>7.3f}"
                     f"{r['epochs']:>7}{minutes:>7}")
    groups = list(result["rows"][0].get("bias_by_age_group", {})) if result["rows"] else []
    if groups:
        lines.append(f"{'bias by age group':<22}" + "".join(f"{g:>9}" for g in groups))
        for r in result["rows"]:
            biases = [r["bias_by_age_group"].get(g) for g in groups]
            lines.append(f"{r['variant']:<22}" + "".join(
                f"{'-':>9}" if b is None else f"{b:>+9.2f}" for b in biases))
    calibrated = [r for r in result["rows"] if "calibrated" in r]
    if calibrated:
        lines.append("each run's calibration (fitted on images it neither trained on "
                     "nor was chosen on), on the same images:")
        lines.append(f"{'':<22}{'MAE':>7}{'acc+-12':>9}{'+-months':>9}{'covered':>9}"
                     + "".join(f"{g:>9}" for g in groups))
        for r in calibrated:
            c = r["calibrated"]
            cover = [c["coverage_by_age_group"].get(g) for g in groups]
            lines.append(f"{r['variant']:<22}{c['mae']:>7.2f}{c['tolerance_accuracy']:>9.3f}"
                         f"{c['half_width']:>9.1f}{c['coverage']:>9.3f}" + "".join(
                             f"{'-':>9}" if v is None else f"{v:>9.3f}" for v in cover))
    for c in result["comparisons"]:
        lines.append(f"{c['b']} - {c['a']}: MAE {c['difference']:+.2f} months, 95% CI "
                     f"[{c['ci_low']:+.2f}, {c['ci_high']:+.2f}] (n={c['n']})")
    lines.append(f"wrote {out_dir}/benchmark.json and report.html")
    return "\n".join(lines)


def export_summary(meta: dict[str, Any], out_dir: Any) -> str:
    """What ``export`` wrote, and each format it skipped with the reason."""
    lines = [(f"exported {', '.join(meta['formats'])} to {out_dir} (input "
             f"{meta['image_size']}x{meta['image_size']}x1, sex input: {meta['use_sex']})")]
    lines += [f"skipped {name}: {why}" for name, why in meta.get("skipped", {}).items()]
    return "\n".join(lines)
