"""What an experiment leaves behind: the table of trials (printed and CSV) and eval-loss curves.

    rows = trial_rows(result_grid, metric="eval_loss", mode="min", max_steps=40)
    write_results(rows, grid, out_dir)  ->  trials.csv, curves.png, curves/<trial>.png
"""

from __future__ import annotations

import csv
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from attune.plots import plot_losses, plot_metric_curves

# The key TuneReportCallback puts a reported checkpoint's path under.
CHECKPOINT_PATH = "checkpoint_path"


@dataclass
class TrialRow:
    trial: str
    params: dict
    final: float | None  # the metric at the trial's last report
    best: float | None  # the best value of the metric over its reports
    steps: int  # the last step it reported
    reports: int  # Tune iterations (one per report)
    stopped_early: bool  # ended before the recipe's last step (scheduler or time limit)
    error: str | None
    checkpoint: str | None  # the Train checkpoint of its last report, if that report had one


def trial_rows(grid, metric: str, mode: str, max_steps: int) -> list[TrialRow]:
    rows = []
    for result in grid:
        frame = result.metrics_dataframe
        values = [] if frame is None or metric not in frame else [v for v in frame[metric] if not _nan(v)]
        last = result.metrics or {}
        steps = int(last.get("step", 0))
        rows.append(TrialRow(
            trial=last.get("trial_id") or Path(result.path).name,
            params=dict(result.config or {}),
            final=values[-1] if values else None,
            best=(min(values) if mode == "min" else max(values)) if values else None,
            steps=steps,
            reports=int(last.get("training_iteration", 0)),
            stopped_early=result.error is None and steps < max_steps,
            error=None if result.error is None else str(result.error).splitlines()[0][:200],
            checkpoint=last.get(CHECKPOINT_PATH),
        ))
    return sorted(rows, key=lambda r: r.trial)


def best_row(rows: list[TrialRow], mode: str, max_steps: int) -> TrialRow | None:
    """The trial whose final model is best: it ran every step and its last report is best."""
    done = [r for r in rows if r.error is None and r.steps >= max_steps and r.checkpoint
            and r.final is not None]
    if not done:
        return None
    pick = min if mode == "min" else max
    return pick(done, key=lambda r: r.final)


def format_table(rows: list[TrialRow], metric: str, best: TrialRow | None) -> str:
    keys = sorted({k for r in rows for k in r.params})
    header = ["trial", *keys, metric, f"best {metric}", "steps", "reports", "stopped early"]
    lines = [header]
    for r in rows:
        status = "error" if r.error else ("yes" if r.stopped_early else "no")
        mark = " *" if best is not None and r.trial == best.trial else ""
        lines.append([r.trial + mark, *(_fmt(r.params.get(k)) for k in keys), _fmt(r.final),
                      _fmt(r.best), str(r.steps), str(r.reports), status])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(text)


def write_results(rows: list[TrialRow], grid, out_dir: Path, metric: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    keys = sorted({k for r in rows for k in r.params})
    with open(out_dir / "trials.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["trial", *keys, f"final_{metric}", f"best_{metric}", "steps", "reports",
                         "stopped_early", "error", "checkpoint"])
        for r in rows:
            writer.writerow([r.trial, *(r.params.get(k) for k in keys), r.final, r.best, r.steps,
                             r.reports, r.stopped_early, r.error or "", r.checkpoint or ""])
    _plot_curves(grid, out_dir, metric)


def _plot_curves(grid, out_dir: Path, metric: str) -> None:
    """One figure with every trial's curve (where ASHA's cuts show), and one figure per trial."""
    (out_dir / "curves").mkdir(exist_ok=True)
    curves = {}
    for result in grid:
        frame = result.metrics_dataframe
        if frame is None or metric not in frame or "step" not in frame:
            continue
        trial = result.metrics.get("trial_id") or Path(result.path).name
        curves[trial] = (list(frame["step"]), list(frame[metric]))
        history = frame[[c for c in ("step", "loss", "eval_loss") if c in frame]].to_dict("records")
        if "loss" in frame:
            plot_losses(history, out_dir / "curves" / f"{trial}.png", title=trial)
    plot_metric_curves(curves, out_dir / "curves.png", metric)


def as_dict(row: TrialRow) -> dict:
    return asdict(row)


def _nan(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
