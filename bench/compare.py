"""``python -m bench compare A B``: are two runs' test scores different, episode by episode?

Every run of one evaluation protocol is tested on the same fixed episodes, so two runs compare by the
per-episode difference of their scores (:mod:`bench.stats`): its mean with a 95% t-interval, how many
episodes each run wins, and the Wilcoxon signed-rank p-value. A run is named by its key (the 12 hex digits
ending its record's file name), its record name, a unique part of the name, or the record file's path.
Runs of different protocols (other ways, shots, queries, split or episode set) are refused: their episode
ids name different episodes.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from bench.leaderboard import protocol_key
from bench.records import read_record, scan_records
from bench.stats import TEST_NAME, compare_paired, episode_scores, paired_scores
from bench.table import format_duration, format_score

ALPHA = 0.05


class CompareError(ValueError):
    """The two runs cannot be compared; the message says why and what to give instead."""


def find_record(reference: str, records_dir: Path) -> dict[str, Any]:
    """The record ``reference`` names: a record file's path, else a key, a record name or a unique part of it."""
    path = Path(reference)
    if path.suffix == ".json" and path.is_file():
        return read_record(path)
    found, _ = scan_records(records_dir)
    exact = [record for key, (_, record) in found.items() if reference in (key, record.get("name"))]
    prefixed = [record for file, record in found.values() if file.stem.startswith(reference)]
    matches = exact or prefixed or [record for file, record in found.values() if reference in file.stem]
    if not matches:
        raise CompareError(f"no record in {records_dir} matches {reference!r}: give a run key (the 12 hex digits "
                           "ending a record's file name), a record name, or a record file's path "
                           "(--records picks the folder)")
    if len(matches) > 1:
        names = sorted(record.get("name", record["key"]) for record in matches)
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        raise CompareError(f"{reference!r} matches {len(names)} records ({shown}): give more of the name, or the key")
    return matches[0]


def protocol_text(record: dict[str, Any]) -> str:
    dataset, arguments, ways, shots, queries, episodes, metric, episode_set = protocol_key(record)
    shown = ", ".join(f"{name}={value}" for name, value in arguments)
    return (f"{dataset} ({shown}) {ways}w{shots}s{queries}q, {episodes} test episodes scored by {metric}, "
            f"episode set {str(episode_set)[:8]}")


def tested(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` itself, after checking it holds per-episode test scores."""
    name = record.get("name", record["key"])
    if record.get("status") != "ok":
        raise CompareError(f"{name} has no test result (status {record.get('status')}: "
                           f"{record.get('error', 'no error recorded')}); rerun it first")
    if not episode_scores(record) or not record["test"].get("episodes_sha1"):
        raise CompareError(f"{name} has no per-episode test scores or episode fingerprint (a record older than "
                           "the paired tests); "
                           "rerun it to compare it episode by episode")
    return record


@dataclass
class Comparison:
    """Run ``a`` against run ``b`` on their shared test episodes (differences are ``a - b``)."""

    a: dict[str, Any]
    b: dict[str, Any]
    episodes: int
    mean_difference: float
    ci95: float  # half-width of the 95% t-interval of the mean difference
    a_higher: int  # episodes where a's score is the higher one
    b_higher: int
    p_value: float

    @property
    def higher_is_better(self) -> bool:
        return self.a.get("metric") == "acc"

    @property
    def verdict(self) -> str:
        if self.p_value >= ALPHA:
            return f"no significant difference at the {ALPHA:g} level"
        a_ahead = (self.mean_difference > 0) == self.higher_is_better
        return f"{'a' if a_ahead else 'b'} is better (p < {ALPHA:g})"


def compare_records(a: dict[str, Any], b: dict[str, Any]) -> Comparison:
    """Pair ``a`` and ``b`` episode by episode; :class:`CompareError` if they were tested on different episodes."""
    a, b = tested(a), tested(b)
    if protocol_key(a) != protocol_key(b):
        raise CompareError(f"the runs were tested on different episodes, so they cannot be paired:\n"
                           f"  a: {protocol_text(a)}\n  b: {protocol_text(b)}\n"
                           "compare runs from one leaderboard table (same dataset, split, ways, shots, queries "
                           "and test episodes)")
    scores_a, scores_b = episode_scores(a), episode_scores(b)
    paired = compare_paired(scores_a, scores_b)
    x, y = paired_scores(scores_a, scores_b)
    differences = x - y
    n = len(differences)
    ci95 = float(stats.t.ppf(0.975, n - 1) * differences.std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan")
    return Comparison(a, b, paired.episodes, float(differences.mean()), ci95,
                      int((differences > 0).sum()), int((differences < 0).sum()), paired.p_value)


def describe_run(record: dict[str, Any]) -> str:
    config, train = record["config"], record.get("train") or {}
    seconds = train.get("seconds")
    trained = f", {format_duration(seconds)} training" if seconds is not None else ""
    return (f"{record.get('name', record['key'])}  ({config.get('suite') or 'adhoc'}, "
            f"{config['steps']} steps × {config['meta_batch']}{trained})  {format_score(record)}")


def render(comparison: Comparison) -> str:
    """The comparison as the lines ``bench compare`` prints."""
    scale, unit = (100.0, " points") if comparison.higher_is_better else (1.0, "")
    ties = comparison.episodes - comparison.a_higher - comparison.b_higher
    low = scale * (comparison.mean_difference - comparison.ci95)
    high = scale * (comparison.mean_difference + comparison.ci95)
    return "\n".join([
        f"a: {describe_run(comparison.a)}",
        f"b: {describe_run(comparison.b)}",
        f"a - b: {scale * comparison.mean_difference:+.4g}{unit} (95% CI {low:+.4g} to {high:+.4g}) "
        f"over {comparison.episodes} shared test episodes",
        f"episodes where a scores higher: {comparison.a_higher}, b higher: {comparison.b_higher}, ties: {ties}"
        f" ({'higher' if comparison.higher_is_better else 'lower'} is better)",
        f"{TEST_NAME}: p = {comparison.p_value:.3g}: {comparison.verdict}",
    ])


def compare_command(first: str, second: str, records_dir: Path) -> int:
    """Print the comparison of two runs (a :class:`CompareError` says why two runs cannot be compared)."""
    print(render(compare_records(find_record(first, records_dir), find_record(second, records_dir))))
    return 0
