"""Episodes as indices: the seeded sampler, the fixed evaluation episodes, and the Episode batch.

An N-way K-shot episode with Q queries per class is an integer tensor ``[ways, shots + queries]`` of
flat store indices (see :mod:`datamodules.store`); a meta-batch stacks ``tasks`` of them. Sampling a
whole meta-batch is a handful of tensor ops, whatever its size: no Python runs per image.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch


@dataclass
class Episode:
    """A meta-batch of episodes on the training device.

    ``support_x``: ``[tasks, ways * shots, ...]``; ``query_x``: ``[tasks, ways * queries, ...]``.
    Labels are ``0..ways-1`` in support order (class order is already random). ``ids`` are the fixed
    evaluation-episode ids (``-1`` for training episodes), used to record per-episode results.
    """

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor
    ids: torch.Tensor
    ways: int

    @property
    def tasks(self) -> int:
        return self.support_x.shape[0]

    @property
    def shots(self) -> int:
        return self.support_x.shape[1] // self.ways

    @property
    def queries(self) -> int:
        return self.query_x.shape[1] // self.ways

    @classmethod
    def from_support_then_query(cls, x: torch.Tensor, tasks: int, ways: int, shots: int,
                                ids: torch.Tensor) -> "Episode":
        """The episode of examples ``[tasks * ways * (shots + queries), ...]`` gathered in
        :func:`support_then_query` order; support and query sets are views, nothing is copied."""
        feature_shape = x.shape[1:]
        n_support = tasks * ways * shots
        queries = (x.shape[0] - n_support) // (tasks * ways)
        labels = torch.arange(ways, device=x.device)
        return cls(
            support_x=x[:n_support].view(tasks, ways * shots, *feature_shape),
            support_y=labels.repeat_interleave(shots).expand(tasks, -1),
            query_x=x[n_support:].view(tasks, ways * queries, *feature_shape),
            query_y=labels.repeat_interleave(queries).expand(tasks, -1),
            ids=ids,
            ways=ways,
        )

    @classmethod
    def from_grouped(cls, x: torch.Tensor, shots: int, ids: torch.Tensor) -> "Episode":
        """Split gathered examples ``[tasks, ways, shots + queries, ...]`` into support and query."""
        tasks, ways, total = x.shape[:3]
        queries = total - shots
        feature_shape = x.shape[3:]
        labels = torch.arange(ways, device=x.device)
        return cls(
            support_x=x[:, :, :shots].reshape(tasks, ways * shots, *feature_shape),
            support_y=labels.repeat_interleave(shots).expand(tasks, -1),
            query_x=x[:, :, shots:].reshape(tasks, ways * queries, *feature_shape),
            query_y=labels.repeat_interleave(queries).expand(tasks, -1),
            ids=ids,
            ways=ways,
        )


def distinct_draws(rows: tuple[int, ...], population: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` distinct integers of ``[0, population)`` per row, in random order: ``[*rows, count]``.

    A uniformly random ordered subset either way. Sparse draws (``count**2 <= population``, e.g. 5 of
    4112 Omniglot classes) draw with replacement and redraw the rare rows that repeat a value, which
    costs O(count) per row; dense draws take the ``count`` largest of ``population`` uniform scores.
    """
    if count > population:
        raise ValueError(f"cannot draw {count} distinct values from {population}")
    if count * count > population:
        return torch.rand(*rows, population, generator=generator).topk(count, dim=-1, sorted=False).indices
    draws = torch.randint(population, (*rows, count), generator=generator).reshape(-1, count)
    while True:
        ordered = draws.sort(dim=1).values
        repeated = (ordered[:, 1:] == ordered[:, :-1]).any(dim=1).nonzero().flatten()
        if repeated.numel() == 0:
            return draws.reshape(*rows, count)
        draws[repeated] = torch.randint(population, (repeated.numel(), count), generator=generator)


def support_then_query(indices: torch.Tensor, shots: int) -> torch.Tensor:
    """Episode indices ``[tasks, ways, shots + queries]`` reordered flat: all support examples, then all queries.

    Gathering in this order lets :meth:`Episode.from_support_then_query` cut the support and query
    sets as views, so an episode's pixels are written exactly once.
    """
    return torch.cat([indices[:, :, :shots].reshape(-1), indices[:, :, shots:].reshape(-1)])


def seeded_generator(*seeds: int) -> torch.Generator:
    """A CPU generator seeded from several integers (e.g. global seed and rank), stably."""
    value = 0x9E3779B97F4A7C15
    for seed in seeds:
        value = (value ^ (int(seed) + 0x9E3779B97F4A7C15 + (value << 6) + (value >> 2))) & ((1 << 63) - 1)
    generator = torch.Generator()
    generator.manual_seed(value)
    return generator


class EpisodeSampler:
    """Samples meta-batches of N-way episodes as flat store indices.

    ``class_ids`` are the store classes this split may use; ``per_class`` is the number of examples of
    every class in the store. Classes in an episode are distinct; examples within a class are
    distinct (drawn without replacement).
    """

    def __init__(self, class_ids: torch.Tensor, per_class: int, ways: int, shots: int, queries: int) -> None:
        self.class_ids = class_ids.long()
        self.per_class = per_class
        self.ways = ways
        self.shots = shots
        self.queries = queries

    @property
    def examples_per_class(self) -> int:
        return self.shots + self.queries

    def sample(self, tasks: int, generator: torch.Generator) -> torch.Tensor:
        """Flat indices ``[tasks, ways, shots + queries]`` for ``tasks`` episodes."""
        return self.sample_examples(self.sample_classes(tasks, generator), generator)

    def sample_classes(self, tasks: int, generator: torch.Generator) -> torch.Tensor:
        """Store class ids ``[tasks, ways]``, distinct within each episode."""
        return self.class_ids[distinct_draws((tasks,), self.class_ids.numel(), self.ways, generator)]

    def sample_examples(self, classes: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Flat indices ``[tasks, ways, shots + queries]``: distinct examples of each class in ``classes``."""
        examples = distinct_draws(tuple(classes.shape), self.per_class, self.examples_per_class, generator)
        return classes.unsqueeze(-1) * self.per_class + examples


class GroupedEpisodeSampler(EpisodeSampler):
    """Episodes whose classes all come from one group, e.g. one Omniglot alphabet.

    This is the one-shot task of Lake et al. 2015 ("Human-level concept learning through
    probabilistic program induction"): 20-way 1-shot episodes, all 20 characters from one
    evaluation alphabet. Per episode a group is drawn uniformly among the groups with at least
    ``ways`` classes, then ``ways`` distinct classes of that group; both in one batched step.
    """

    def __init__(self, class_ids: torch.Tensor, groups: torch.Tensor, per_class: int, ways: int, shots: int,
                 queries: int) -> None:
        super().__init__(class_ids, per_class, ways, shots, queries)
        if groups.shape != self.class_ids.shape:
            raise ValueError("one group id per class is required")
        group_ids, group_of_class, counts = groups.unique(return_inverse=True, return_counts=True)
        eligible = torch.nonzero(counts >= ways).flatten()
        if eligible.numel() == 0:
            raise ValueError(f"no group has {ways} classes (largest has {int(counts.max())}); lower ways")
        # table[g, j]: the j-th class of group g (padded with -1); positions >= counts[g] are invalid.
        order = torch.argsort(group_of_class, stable=True)
        starts = torch.cumsum(counts, 0) - counts
        column = torch.arange(order.numel()) - starts[group_of_class[order]]
        table = torch.full((group_ids.numel(), int(counts.max())), -1, dtype=torch.long)
        table[group_of_class[order], column] = self.class_ids[order]
        self.table, self.counts, self.eligible = table, counts, eligible

    def sample_classes(self, tasks: int, generator: torch.Generator) -> torch.Tensor:
        pick = torch.randint(self.eligible.numel(), (tasks,), generator=generator)
        group = self.eligible[pick]
        scores = torch.rand(tasks, self.table.shape[1], generator=generator)
        valid = torch.arange(self.table.shape[1]) < self.counts[group].unsqueeze(1)
        chosen = scores.masked_fill(~valid, -1.0).topk(self.ways, dim=1, sorted=False).indices
        return self.table[group.unsqueeze(1), chosen]


def fixed_episodes(sampler: EpisodeSampler, count: int, seed: int) -> torch.Tensor:
    """``count`` evaluation episodes ``[count, ways, shots + queries]``, a pure function of (seed, count, ways, shots, queries).

    Sampled in chunks of a fixed size, so the episodes do not depend on any batch size used later.
    """
    generator = seeded_generator(seed, sampler.ways, sampler.shots, sampler.queries)
    chunks = [sampler.sample(min(256, count - start), generator) for start in range(0, count, 256)]
    return torch.cat(chunks) if chunks else torch.empty(0, sampler.ways, sampler.examples_per_class, dtype=torch.long)


def episodes_fingerprint(episodes: torch.Tensor) -> str:
    """A short SHA-1 of fixed evaluation episodes (their shape, dtype and values).

    Two records with the same fingerprint were scored on the identical episodes, so the leaderboard
    may compare them episode by episode; a change to the sampler that alters them changes it.
    """
    tensor = episodes.detach().cpu().contiguous()
    digest = hashlib.sha1(f"{tuple(tensor.shape)}|{tensor.dtype}|".encode())
    digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()[:16]
