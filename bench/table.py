"""A plain-text results table of records, for terminals."""
from __future__ import annotations

from typing import Any


def format_duration(seconds: float) -> str:
    """``3h07m``, ``12m05s`` or ``42s``."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    if hours:
        return f"{hours}h{rest // 60:02d}m"
    return f"{rest // 60}m{rest % 60:02d}s" if rest >= 60 else f"{rest}s"


def format_score(record: dict[str, Any]) -> str:
    test = record.get("test") or {}
    if record.get("status") != "ok" or not test:
        return record.get("status", "?")
    if record.get("metric") == "acc":
        return f"{100 * test['mean']:.2f} ± {100 * test['ci95']:.2f}%"
    return f"{test['mean']:.4f} ± {test['ci95']:.4f}"


def print_table(records: list[dict[str, Any]]) -> None:
    header = ("algorithm", "dataset", "setting", "score (95% CI)", "episodes", "steps", "train s", "episodes/s")
    rows = [header]
    for record in records:
        config, train = record["config"], record.get("train", {})
        split = config.get("dataset_args", {}).get("split")
        rows.append((
            config["algorithm"], f"{config['dataset']}{'-' + split if split else ''}",
            f"{config['ways']}w{config['shots']}s", format_score(record),
            str((record.get("test") or {}).get("episodes", "")), str(train.get("steps", "")),
            f"{train['seconds']:.0f}" if "seconds" in train else "",
            f"{train['episodes_per_s']:.1f}" if "episodes_per_s" in train else "",
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for index, row in enumerate(rows):
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)))
        if index == 0:
            print("  ".join("-" * width for width in widths))
