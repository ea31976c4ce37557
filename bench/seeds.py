"""Training-seed spread: one recipe trained with several seeds, each tested on the same fixed episodes.

A run's 95% CI covers its test episodes only: it says how precisely *that trained model* was measured, not
how far the score moves when the same recipe is trained again from another seed (initial weights, training
episodes). Bouthillier et al. 2021 ("Accounting for Variance in Machine Learning Benchmarks", MLSys) show the
second is often the larger. Where a leaderboard table holds one recipe (every setting but the seed,
:meth:`bench.config.RunConfig.semantic_hash`) at two or more seeds, it also shows the mean over the seeds and
their standard deviation, next to the runs' own CI over episodes.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from bench.config import RunConfig
from bench.leaderboard import Entry, Table

HEADER = ("algorithm", "seeds", "mean over seeds ± sd", "range", "each seed", "typical 95% CI of one run",
          "budget (steps × meta-batch)", "training")


@dataclass
class SeedGroup:
    """The runs of one recipe that differ only in their seed, in seed order."""

    entries: list[Entry]

    @property
    def algorithm(self) -> str:
        return self.entries[0].algorithm

    @property
    def scores(self) -> np.ndarray:
        """Each seed's test mean, in the unit the table shows."""
        return np.array([entry.shown_mean for entry in self.entries])

    @property
    def mean(self) -> float:
        return float(self.scores.mean())

    @property
    def std(self) -> float:
        """Standard deviation of the test means over seeds (n - 1 in the denominator)."""
        return float(self.scores.std(ddof=1))

    @property
    def typical_ci95(self) -> float:
        """Median of the runs' own 95% CI half-widths over test episodes."""
        return float(np.median([entry.shown_ci95 for entry in self.entries]))


def seed_groups(table: Table) -> list[SeedGroup]:
    """The table's recipes run at two or more seeds, best mean first."""
    by_recipe: dict[str, list[Entry]] = defaultdict(list)
    for entry in table.entries:
        by_recipe[RunConfig.semantic_hash(entry.config, ignore=("seed",))].append(entry)
    groups = [SeedGroup(sorted(entries, key=lambda e: e.config["seed"]))
              for entries in by_recipe.values() if len(entries) >= 2]
    sign = -1 if table.higher_is_better else 1  # entry.mean is the raw score (accuracy or MSE), as ranks use
    return sorted(groups, key=lambda g: (sign * float(np.mean([e.mean for e in g.entries])), g.entries[0].record["name"]))


def seed_row(group: SeedGroup) -> list[str]:
    """The cells of ``group``'s row under :data:`HEADER`."""
    digits = 2 if group.entries[0].record.get("metric") == "acc" else 4
    first = group.entries[0]
    each = ", ".join(f"{e.config['seed']}: {e.shown_mean:.{digits}f}" for e in group.entries)
    return [group.algorithm, str(len(group.entries)), f"{group.mean:.{digits}f} ± {group.std:.{digits}f}",
            f"{group.scores.min():.{digits}f}–{group.scores.max():.{digits}f}", each,
            f"± {group.typical_ci95:.{digits}f}", first.budget, first.training]
