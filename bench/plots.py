"""Leaderboard plots (PNG, matplotlib's Agg backend): scores with 95% CI bars, score vs training time, and
validation curves."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

if TYPE_CHECKING:
    from bench.leaderboard import Entry, Table

PNG_METADATA = {"Software": None}  # no version stamp: the same records give the same files


def entry_label(entry: "Entry", table: "Table") -> str:
    """Algorithm name, plus the seed when the table holds the algorithm more than once."""
    repeated = sum(e.algorithm == entry.algorithm for e in table.entries) > 1
    return f"{entry.algorithm} (seed {entry.config['seed']}, {entry.budget})" if repeated else entry.algorithm


def axis_label(table: "Table") -> str:
    if table.metric != "acc":
        return f"test {table.metric.upper()} (lower is better)"
    return "test error rate (%, lower is better)" if table.error_rate else "test accuracy (%)"


def plot_scores(table: "Table", path: Path) -> Path:
    """Horizontal bars of the mean test score with 95% CI error bars; published numbers as diamonds."""
    entries = table.entries[::-1]  # best at the top
    figure, axes = plt.subplots(figsize=(7, 0.45 * len(entries) + 1.4))
    positions = range(len(entries))
    axes.barh(positions, [e.shown_mean for e in entries], xerr=[e.shown_ci95 for e in entries],
              color="#4c78a8", ecolor="black", capsize=3)
    papers = [(i, e.paper.value) for i, e in zip(positions, entries) if e.paper]
    if papers:
        axes.scatter([v for _, v in papers], [i for i, _ in papers], marker="D", color="#e45756", zorder=3,
                     label="published")
        axes.legend(loc="best", framealpha=0.8)
    axes.set_yticks(list(positions), [entry_label(e, table) for e in entries])
    low = min(e.shown_mean - e.shown_ci95 for e in entries)
    values = [e.shown_mean + e.shown_ci95 for e in entries] + [v for _, v in papers]
    if table.metric == "acc":
        axes.set_xlim(max(0.0, low - 5), min(100.0, max(values) + 2))
    axes.set_xlabel(axis_label(table))
    axes.set_title(table.title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110, metadata=PNG_METADATA)
    plt.close(figure)
    return path


def plot_time(table: "Table", path: Path) -> Path:
    """Test score (with CI) against training wall-clock time, log scale."""
    figure, axes = plt.subplots(figsize=(7, 4.2))
    for entry in table.entries:
        seconds = max(entry.train_seconds or 0.0, 1e-3)
        axes.errorbar([seconds], [entry.shown_mean], yerr=[entry.shown_ci95], fmt="o", capsize=3)
        axes.annotate(entry_label(entry, table), (seconds, entry.shown_mean), textcoords="offset points",
                      xytext=(5, 4), fontsize=8)
    axes.set_xscale("log")
    axes.margins(x=0.25, y=0.15)
    axes.set_xlabel("training wall-clock time (s, validation excluded)")
    axes.set_ylabel(axis_label(table))
    axes.set_title(table.title, fontsize=9)
    axes.grid(True, which="both", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110, metadata=PNG_METADATA)
    plt.close(figure)
    return path


def validation_curve(entry: "Entry") -> tuple[list[float], list[float]]:
    """The entry's validation scores (in the table's unit) against training time, assuming a constant rate:
    a validation at step s of S is placed at s / S of the training wall-clock time. Empty without a curve."""
    train, metric = entry.record.get("train") or {}, entry.record.get("metric") or "acc"
    steps, seconds = train.get("steps"), train.get("seconds")
    points = [v for v in train.get("validations") or [] if f"val/{metric}" in v]
    if not steps or not seconds or len(points) < 2:
        return [], []
    times = [seconds * v["step"] / steps for v in points]
    values = [v[f"val/{metric}"] for v in points]
    if metric == "acc":
        values = [100 * (1 - v) if entry.error_rate else 100 * v for v in values]
    return times, values


def plot_curves(table: "Table", path: Path) -> Path | None:
    """Validation score against training time for every entry that logged at least two validations: shows
    whether a run had converged when its budget ended. ``None`` (no file) when no entry has a curve."""
    curves = [(entry, *validation_curve(entry)) for entry in table.entries]
    curves = [(entry, times, values) for entry, times, values in curves if times]
    if not curves:
        return None
    figure, axes = plt.subplots(figsize=(7, 4.2))
    for entry, times, values in curves:
        axes.plot(times, values, marker="o", markersize=3, label=entry_label(entry, table))
    axes.set_xscale("log")
    axes.set_xlabel("training wall-clock time (s), at the run's average rate")
    axes.set_ylabel(axis_label(table).replace("test", "validation"))
    axes.set_title(table.title, fontsize=9)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=7, loc="best", framealpha=0.8)
    figure.tight_layout()
    figure.savefig(path, dpi=110, metadata=PNG_METADATA)
    plt.close(figure)
    return path


def plot_tables(tables: list["Table"], folder: Path) -> list[Path]:
    """Both plots of every table under ``folder`` (old PNGs there are removed first); their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("*.png"):
        stale.unlink()
    paths = []
    for table in tables:
        paths.append(plot_scores(table, folder / f"{table.slug}-scores.png"))
        paths.append(plot_time(table, folder / f"{table.slug}-time.png"))
        curves = plot_curves(table, folder / f"{table.slug}-curves.png")
        if curves:
            paths.append(curves)
    return paths
