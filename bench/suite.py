"""Suites are data: a YAML file expands into RunConfigs (algorithms x grid of settings).

Format (see ``bench/suites/quick.yaml``)::

    name: quick
    description: one line shown in listings                # optional
    defaults: {dataset: omniglot, test_episodes: 1000}   # any RunConfig field
    grid: {ways: [5], shots: [1], seed: [0]}               # cartesian product
    algorithms:                                           # per-algorithm RunConfig fields
      protonet: {train_ways: 60, steps: 2000, hparams: {lr: 0.001}}
    overrides:                                            # optional, applied in order
      - when: {algorithm: maml, ways: 20}
        set: {hparams: {inner_lr: 0.1}}
"""
from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path
from typing import Any

import yaml

from bench.config import RunConfig

SUITES_DIR = Path(__file__).parent / "suites"
SPEC_KEYS = ("name", "description", "defaults", "grid", "algorithms", "overrides")


def suite_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.exists():
        return path
    candidate = SUITES_DIR / f"{name_or_path}.yaml"
    if not candidate.exists():
        known = sorted(p.stem for p in SUITES_DIR.glob("*.yaml"))
        raise ValueError(f"unknown suite {name_or_path!r}: choose one of {known} or give a YAML path")
    return candidate


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``base`` updated with ``extra``; nested dicts (hparams, dataset_args) are merged, not replaced."""
    merged = dict(base)
    for key, value in extra.items():
        merged[key] = _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


def check_spec(spec: Any, source: str) -> None:
    """One clear error for a malformed suite file."""
    if not isinstance(spec, dict) or not isinstance(spec.get("algorithms"), dict) or not spec["algorithms"]:
        raise ValueError(f"{source}: a suite is a mapping with a non-empty 'algorithms' mapping (see bench/suite.py)")
    unknown = sorted(set(spec) - set(SPEC_KEYS))
    if unknown:
        raise ValueError(f"{source}: unknown suite key(s) {unknown}; a suite has {list(SPEC_KEYS)}")
    grid = spec.get("grid") or {}
    if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
        raise ValueError(f"{source}: 'grid' maps run settings to non-empty lists, e.g. grid: {{shots: [1, 5]}}")
    for override in spec.get("overrides") or []:
        if not isinstance(override, dict) or set(override) != {"when", "set"}:
            raise ValueError(f"{source}: each override is {{when: {{...}}, set: {{...}}}}, got {override!r}")


def check_registered(configs: list[RunConfig], source: str) -> None:
    """Fail before any run starts if a suite names an algorithm or dataset that does not exist."""
    from datamodules import DATASETS
    from tasks import ALGORITHMS

    for kind, known, used in (("algorithm", ALGORITHMS, {c.algorithm for c in configs}),
                              ("dataset", DATASETS, {c.dataset for c in configs})):
        missing = sorted(u for u in used if u.lower() not in known)
        if missing:
            raise ValueError(f"{source}: unknown {kind}(s) {missing}; known: {', '.join(sorted(known))}")


def expand_suite(spec: dict[str, Any], algorithms: list[str] | None = None) -> list[RunConfig]:
    """All runs of a suite spec, optionally restricted to some algorithms."""
    name = spec.get("name", "adhoc")
    check_spec(spec, f"suite {name!r}")
    grid = spec.get("grid", {})
    chosen = spec["algorithms"]
    if algorithms:
        missing = sorted(set(algorithms) - set(chosen))
        if missing:
            raise ValueError(f"suite {name!r} has no algorithm(s) {missing}; it has {sorted(chosen)}")
        chosen = {a: chosen[a] for a in algorithms}
    runs: dict[tuple[str, int], RunConfig] = {}  # by (algorithm, index of the grid point)
    for algorithm, algorithm_fields in spec["algorithms"].items():
        for point, values in enumerate(itertools.product(*grid.values())):
            fields = _merge(_merge({"suite": name, **spec.get("defaults", {})}, dict(zip(grid, values))),
                            {"algorithm": algorithm, **(algorithm_fields or {})})
            for override in spec.get("overrides", []):
                if all(fields.get(k) == v for k, v in override["when"].items()):
                    fields = _merge(fields, override["set"])
            runs[algorithm, point] = RunConfig.from_dict(fields)
    resolve_init_from(runs, name)
    return [config for (algorithm, _), config in runs.items() if algorithm in chosen]


def resolve_init_from(runs: dict[tuple[str, int], RunConfig], suite: str) -> None:
    """``init_from: <algorithm of this suite>`` -> the name of that algorithm's run at the same grid point,
    which is told to save its weights (``save_weights`` does not change its key). Other values name a run
    directly and are kept."""
    algorithms = {algorithm for algorithm, _ in runs}
    sources = {point: config.init_from for point, config in runs.items()}
    for (algorithm, point), source in sources.items():
        if source not in algorithms:
            continue
        if source == algorithm:
            raise ValueError(f"suite {suite!r}: {algorithm} cannot be initialised from its own run (init_from)")
        if sources[source, point] in algorithms:
            raise ValueError(f"suite {suite!r}: {algorithm} is initialised from {source}, which is itself "
                             "initialised from another algorithm of the suite; chains are not supported")
        pretraining = runs[source, point] = dataclasses.replace(runs[source, point], save_weights=True)
        runs[algorithm, point] = dataclasses.replace(runs[algorithm, point], init_from=pretraining.name)


def load_suite(name_or_path: str, algorithms: list[str] | None = None,
               settings: list[str] | None = None, seeds: list[int] | None = None) -> list[RunConfig]:
    """The runs of a suite file, checked against the algorithm and dataset registries; with ``settings``
    (e.g. ``["20w1s"]``) only the runs of those ways/shots settings; with ``seeds`` the suite's grid of seeds
    replaced by these (the same recipes trained from other seeds; a seed the suite already ran keeps its key)."""
    path = suite_path(name_or_path)
    spec = yaml.safe_load(path.read_text())
    check_spec(spec, str(path))
    if seeds:
        if not all(isinstance(seed, int) and not isinstance(seed, bool) and seed >= 0 for seed in seeds):
            raise ValueError(f"seeds must be non-negative integers, got {seeds}")
        fixed = sorted(name for name, fields in spec["algorithms"].items() if "seed" in (fields or {}))
        if fixed:
            raise ValueError(f"{path}: {fixed} set their own seed, so seeds cannot be chosen for the suite")
        spec["grid"] = {**(spec.get("grid") or {}), "seed": list(dict.fromkeys(seeds))}
    configs = expand_suite(spec, algorithms)
    check_registered(configs, str(path))
    return only_settings(configs, settings, str(path)) if settings else configs


def only_settings(configs: list[RunConfig], settings: list[str], where: str) -> list[RunConfig]:
    """The runs whose ``NwKs`` setting is one of ``settings``; an unknown setting is an error listing the suite's."""
    available = sorted({config.setting for config in configs})
    missing = sorted(set(settings) - set(available))
    if missing:
        raise ValueError(f"{where} has no setting(s) {missing}; it has {available} (ways 'w' shots 's')")
    return [config for config in configs if config.setting in settings]
