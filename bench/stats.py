"""Paired comparison of two runs on the identical fixed test episodes (leaderboard and regression check).

Every run of a given evaluation protocol is tested on the same episodes (same ids, same images), so two
runs are compared episode by episode: the Wilcoxon signed-rank test (two-sided, scipy's default
``zero_method="wilcox"``: episodes with equal scores carry no information and are dropped) on the
per-episode score differences. It needs no normality, which matters for MSE scores with heavy tails.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats

TEST_NAME = "Wilcoxon signed-rank (two-sided), paired by episode id"


@dataclass
class PairedComparison:
    """``mean_a - mean_b`` over the ``episodes`` both runs share, and the test's p-value."""

    episodes: int
    mean_a: float
    mean_b: float
    p_value: float

    @property
    def difference(self) -> float:
        return self.mean_a - self.mean_b


def scores_by_episode(ids: list[int], scores: list[float]) -> dict[int, float]:
    return {int(i): float(s) for i, s in zip(ids or [], scores or [])}


def episode_scores(record: dict[str, Any]) -> dict[int, float]:
    """Episode id -> test score of a record (empty when the record has none)."""
    test = record.get("test") or {}
    return scores_by_episode(test.get("episode_ids"), test.get("episode_scores"))


def paired_scores(a: dict[int, float], b: dict[int, float]) -> tuple[np.ndarray, np.ndarray]:
    """The two runs' scores on the episode ids they share, in id order."""
    common = sorted(set(a) & set(b))
    if not common:
        raise ValueError("the two runs share no test episode ids: they were not evaluated on the same episodes")
    return np.array([a[i] for i in common]), np.array([b[i] for i in common])


def compare_paired(a: dict[int, float], b: dict[int, float]) -> PairedComparison:
    """Compare two runs' per-episode scores on their common episode ids (see module docstring)."""
    x, y = paired_scores(a, b)
    differences = x - y
    if not np.any(differences != 0):
        p_value = 1.0  # identical on every episode: no evidence of any difference
    else:
        p_value = float(stats.wilcoxon(x, y, alternative="two-sided").pvalue)
    return PairedComparison(len(x), float(x.mean()), float(y.mean()), p_value)
