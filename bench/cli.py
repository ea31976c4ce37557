"""Command line of the harness (``python -m bench COMMAND``; the Makefile targets call these).

* ``run``: train and test one configuration, write its record (flags, ``--config`` YAML, or both;
  algorithm and data-module arguments as ``--hp name=value`` / ``--data name=value``, values parsed as YAML).
* ``suite NAME``: run a suite's pending runs over a device pool (resumable), print the table.
* ``leaderboard``: rebuild the leaderboard files from the records.
* ``regress``: run the ``ci`` suite and compare it with the committed baseline (``--update`` rewrites it).
* ``compare A B``: two runs' test scores paired by episode (difference, 95% CI, wins, Wilcoxon p).
* ``temperature SUITE``: the loss of a ProtoNet run's first training episodes at each temperature, from the
  backbone it starts with (pick the temperature before training from a pre-trained backbone).
* ``wandb-sync`` / ``report``: upload offline W&B runs; build a W&B report of a suite.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import yaml

from bench.config import RunConfig

DEFAULT_RESULTS = Path(os.environ.get("METABENCH_RESULTS", "results"))
RUN_FIELDS = (("algorithm", str), ("dataset", str), ("ways", int), ("shots", int), ("queries", int),
              ("train_ways", int), ("train_shots", int), ("train_queries", int), ("meta_batch", int),
              ("eval_batch", int), ("steps", int), ("val_every", int), ("val_episodes", int),
              ("test_episodes", int), ("seed", int), ("accelerator", str), ("devices", int), ("num_nodes", int),
              ("threads", int), ("suite", str), ("precision", str), ("init_from", str))


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
    parser.add_argument("--config", type=Path, help="YAML (or JSON) file of RunConfig fields")
    for field, kind in RUN_FIELDS:
        parser.add_argument(f"--{field.replace('_', '-')}", dest=field, type=kind)
    parser.add_argument("--save-weights", action="store_true", default=None,
                        help="save the embedding network to <results>/weights/ for runs that --init-from this one")
    parser.add_argument("--hp", action="append", default=[], metavar="NAME=VALUE", help="algorithm argument")
    parser.add_argument("--data", action="append", default=[], metavar="NAME=VALUE", help="data-module argument")
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    parser.add_argument("--no-progress", action="store_true")


def _workers(text: str) -> int | None:
    """``--workers``: a positive count, or ``auto`` (None)."""
    if str(text).strip().lower() == "auto":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"WORKERS={text!r}: give a number of parallel runs or 'auto'") from None


def _seeds(text: str) -> list[int]:
    """``--seeds``: comma-separated non-negative integers."""
    try:
        seeds = [int(part) for part in str(text).split(",") if part.strip()]
    except ValueError:
        seeds = []
    if not seeds or min(seeds) < 0:
        raise argparse.ArgumentTypeError(f"SEEDS={text!r}: give comma-separated non-negative integers, e.g. 0,1,2")
    return seeds


def _pool_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gpus", default=os.environ.get("GPUS", ""),
                        help="GPU ids for the pool, e.g. 0,1,2,3 (default: every visible GPU; 'none' for CPU)")
    parser.add_argument("--devices", type=int, default=int(os.environ.get("DEVICES") or 1),
                        help="devices per run: > 1 trains each run with DDP over that many GPUs/processes")
    parser.add_argument("--workers", type=_workers, default=_workers(os.environ.get("WORKERS") or "auto"),
                        help="parallel runs on CPU, threads split between them (default auto: one per core, "
                             "at most one per run)")
    parser.add_argument("--in-process", action="store_true",
                        help="run every run inside this process, one at a time (debugging)")


def _suite_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("suite", help="run every pending run of a suite, then print the table")
    parser.add_argument("name", help="suite name under bench/suites or a YAML path")
    parser.add_argument("--algorithms", default="", help="comma-separated subset of the suite's algorithms")
    parser.add_argument("--settings", default="", help="comma-separated subset of the suite's ways/shots settings, "
                                                        "e.g. 20w1s,20w5s")
    parser.add_argument("--seeds", type=_seeds, default=None,
                        help="comma-separated training seeds replacing the suite's, e.g. 0,1,2 (the spread over "
                             "seeds shows in the leaderboard)")
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    parser.add_argument("--force", action="store_true", help="rerun runs that already have a record")
    parser.add_argument("--dry-run", action="store_true", help="list the runs and whether they are pending")
    _pool_arguments(parser)


def _leaderboard_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("leaderboard", help="rebuild README.md, csv, html and plots from the records")
    parser.add_argument("--records", type=Path, default=Path("leaderboard/records"))
    parser.add_argument("--out", type=Path, default=Path("leaderboard"))
    parser.add_argument("--papers", type=Path, default=None, help="published numbers (default leaderboard/papers.yaml)")
    parser.add_argument("--wandb-group", default="leaderboard", help="W&B group of the run that gets the plots")


def _temperature_parser(sub: argparse._SubParsersAction) -> None:
    from bench import temperature

    parser = sub.add_parser("temperature", help="loss of a ProtoNet run's first training episodes per temperature")
    parser.add_argument("name", help="suite name under bench/suites or a YAML path")
    parser.add_argument("--algorithms", default="", help="comma-separated protonet entries of the suite")
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help="records (and weights) folder")
    parser.add_argument("--episodes", type=int, default=5, help="training episodes averaged")
    parser.add_argument("--temperatures", default=",".join(f"{t:g}" for t in temperature.TEMPERATURES))


def _regress_parser(sub: argparse._SubParsersAction) -> None:
    from bench import regress

    parser = sub.add_parser("regress", help="run the ci suite and compare with the committed baseline")
    parser.add_argument("--suite", default="ci")
    parser.add_argument("--baseline", type=Path, default=regress.DEFAULT_BASELINE)
    parser.add_argument("--results", type=Path, default=Path("results/regress"),
                        help="scratch folder for the fresh ci records (emptied first)")
    parser.add_argument("--update", action="store_true", help="rewrite the baseline from a fresh run instead")
    parser.add_argument("--algorithms", default="",
                        help="comma-separated subset: check (or --update) only these algorithms' runs")
    parser.add_argument("--from-records", type=Path, default=None,
                        help="compare (or --update from) the records in this folder instead of running the suite")
    parser.add_argument("--tolerance", type=float, default=None,
                        help="largest accepted drop of the mean test score (default: accuracy 0.02 absolute, "
                             "MSE 0.10 relative)")
    parser.add_argument("--alpha", type=float, default=regress.ALPHA, help="significance level of the paired test")
    parser.add_argument("--throughput-tolerance", type=float, default=regress.THROUGHPUT_TOLERANCE,
                        help="relative training-throughput drop that raises a warning")
    parser.add_argument("--junit", type=Path, default=None, help="also write a JUnit XML report here")
    parser.add_argument("--github", action="store_true", help="also print GitHub Actions annotations")
    _pool_arguments(parser)


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


def make_scheduler(configs: list[RunConfig], results: Path, args: argparse.Namespace, force: bool = False,
                   label: str = "metabench"):
    """The scheduler for ``configs`` on the pool the command line describes."""
    from bench.scheduler import InProcessLauncher, Scheduler, device_slots, parse_gpus

    if args.in_process:
        slots = device_slots([], devices=1, workers=1)
        return Scheduler(configs, results, slots, InProcessLauncher(), force=force, label=label)
    slots = device_slots(parse_gpus(args.gpus), devices=args.devices, workers=args.workers, runs=len(configs))
    return Scheduler(configs, results, slots, force=force, label=label)


def suite_command(args: argparse.Namespace) -> int:
    from bench.records import scan_records
    from bench.suite import load_suite
    from bench.table import print_table

    configs = load_suite(args.name, [a for a in args.algorithms.split(",") if a] or None,
                         [s for s in args.settings.split(",") if s] or None, args.seeds)
    if args.dry_run:
        existing, problems = scan_records(args.results)
        for config in configs:
            record = existing.get(config.key(), (None, {}))[1]
            print(f"{record.get('status', 'pending'):8} {config.name}")
        for problem in problems:
            print(f"WARNING {problem}", file=sys.stderr)
        return 0
    outcome = make_scheduler(configs, args.results, args, force=args.force, label=Path(args.name).stem).run()
    print_table(outcome.records)
    if outcome.failed:
        print(f"\n{len(outcome.failed)} run(s) failed (their records hold the error; rerun to retry):", file=sys.stderr)
        for name in outcome.failed:
            print(f"  {name}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _run_parser(sub)
    _suite_parser(sub)
    _leaderboard_parser(sub)
    _regress_parser(sub)
    _temperature_parser(sub)
    compare = sub.add_parser("compare", help="two runs' test scores paired by episode: difference, 95%% CI, p-value")
    compare.add_argument("a", help="run key, record name, unique part of it, or record file")
    compare.add_argument("b", help="the run to compare with (differences are a - b)")
    compare.add_argument("--records", type=Path, default=Path("leaderboard/records"))
    sub.add_parser("wandb-sync", help="upload offline W&B runs (needs WANDB_API_KEY or `wandb login`, and network)")
    report = sub.add_parser("report", help="build a W&B report of a suite (online), else point to the HTML")
    report.add_argument("--suite", default=os.environ.get("SUITE", "quick"))
    report.add_argument("--records", type=Path, default=Path("leaderboard/records"))
    args = parser.parse_args(argv)

    try:
        if args.command == "run":
            from bench.table import print_table
            from bench.wandb_logging import run_with_wandb

            print_table([run_with_wandb(config_from_args(args), args.results, progress=not args.no_progress)])
            return 0
        if args.command == "suite":
            return suite_command(args)
        if args.command == "leaderboard":
            from bench.leaderboard import build_leaderboard

            return build_leaderboard(args.records, args.out, args.papers, wandb_group=args.wandb_group)
        if args.command == "regress":
            from bench.regress import regress_command

            return regress_command(args)
        if args.command == "temperature":
            from bench.temperature import temperature_command

            return temperature_command(args.name, [a for a in args.algorithms.split(",") if a], args.results,
                                       args.episodes, [float(t) for t in args.temperatures.split(",") if t])
        if args.command == "compare":
            from bench.compare import compare_command

            return compare_command(args.a, args.b, args.records)
        if args.command == "wandb-sync":
            from bench.report import sync_offline_runs

            return sync_offline_runs()
        from bench.report import report_command

        return report_command(args.suite, args.records)
    except ValueError as error:  # bad input: one clear message, no traceback
        print(f"error: {error}", file=sys.stderr)
        return 2
