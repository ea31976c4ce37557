"""Command line: ``python -m bench run ...`` (one run) and ``python -m bench suite NAME`` (a suite).

Settings come from flags, from a YAML file (``--config``), or both (flags win). Algorithm and
data-module arguments are given as ``--hp name=value`` and ``--data name=value`` (values parsed as YAML).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import yaml

from bench.config import RunConfig

DEFAULT_RESULTS = Path(os.environ.get("METABENCH_RESULTS", "results"))


def _pairs(items: list[str]) -> dict:
    parsed = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"expected name=value, got {item!r}")
        key, value = item.split("=", 1)
        parsed[key] = yaml.safe_load(value)
    return parsed


def _run_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("run", help="train and test one configuration, write its record")
    parser.add_argument("--config", type=Path, help="YAML file of RunConfig fields")
    for field, kind in (("algorithm", str), ("dataset", str), ("ways", int), ("shots", int), ("queries", int),
                        ("train_ways", int), ("train_shots", int), ("train_queries", int), ("meta_batch", int),
                        ("eval_batch", int), ("steps", int), ("val_every", int), ("val_episodes", int),
                        ("test_episodes", int), ("seed", int), ("accelerator", str), ("devices", int),
                        ("threads", int), ("suite", str)):
        parser.add_argument(f"--{field.replace('_', '-')}", dest=field, type=kind)
    parser.add_argument("--hp", action="append", default=[], metavar="NAME=VALUE", help="algorithm argument")
    parser.add_argument("--data", action="append", default=[], metavar="NAME=VALUE", help="data-module argument")
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    parser.add_argument("--no-progress", action="store_true")


def config_from_args(args: argparse.Namespace) -> RunConfig:
    values = yaml.safe_load(args.config.read_text()) if args.config else {}
    for field in RunConfig.__dataclass_fields__:
        given = getattr(args, field, None)
        if given is not None and field not in ("hparams", "dataset_args"):
            values[field] = given
    values["hparams"] = {**values.get("hparams", {}), **_pairs(args.hp)}
    values["dataset_args"] = {**values.get("dataset_args", {}), **_pairs(args.data)}
    if "algorithm" not in values:
        raise SystemExit("--algorithm is required (e.g. --algorithm protonet)")
    return RunConfig.from_dict(values)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _run_parser(sub)
    suite = sub.add_parser("suite", help="run every pending run of a suite, then print the table")
    suite.add_argument("name", help="suite name under bench/suites or a YAML path")
    suite.add_argument("--algorithms", default="", help="comma-separated subset of the suite's algorithms")
    suite.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    suite.add_argument("--force", action="store_true", help="rerun runs that already have a record")
    args = parser.parse_args(argv)

    from bench.runner import run
    from bench.table import print_table

    if args.command == "run":
        config = config_from_args(args)
        record = run(config, args.results, progress=not args.no_progress)
        print_table([record])
        return 0
    from bench.suite import load_suite
    from bench.records import read_record

    configs = load_suite(args.name, [a for a in args.algorithms.split(",") if a] or None)
    records = []
    for config in configs:
        path = args.results / f"{config.name}.json"
        if path.exists() and not args.force:
            records.append(read_record(path))
            print(f"[metabench] {config.name}: record exists, skipped (--force to rerun)", file=sys.stderr)
            continue
        records.append(run(config, args.results))
    print_table(records)
    return 0
