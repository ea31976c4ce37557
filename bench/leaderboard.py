"""The leaderboard: a pure function of the run records (plus the published numbers in papers.yaml).

Records are grouped into tables by evaluation protocol (dataset and its arguments, ways, shots,
queries, number of test episodes) and by the fingerprint of the test episodes the run recorded:
within a table every run was tested on the identical fixed episodes (a sampler change that alters
them starts a new table instead of mixing episode sets), so each entry is compared with the table's best entry episode by episode
(:mod:`bench.stats`). :func:`build_leaderboard` writes README.md, leaderboard.csv,
leaderboard.html and plots/*.png; corrupt or partial records and failed runs are listed, never
dropped silently.
"""
from __future__ import annotations

import functools
import inspect
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bench.records import scan_records
from bench.stats import compare_paired, episode_scores

PAPERS = Path(__file__).resolve().parent.parent / "leaderboard" / "papers.yaml"


@dataclass
class PaperNumber:
    value: float  # in the unit shown (accuracy in percent)
    cite: str
    note: str = ""


@dataclass
class Entry:
    """One successful run in a table."""

    record: dict[str, Any]
    paper: PaperNumber | None = None
    p_vs_best: float | None = None  # None for the best entry itself
    rank: int = 0
    error_rate: bool = False  # show 100 - accuracy (the protocol's papers report error rates)
    # Further hyper-parameters shown in the training column: those in which this run differs from another
    # run of its table that would otherwise read the same (see ``mark_distinguishing_hparams``).
    distinguishing: tuple[str, ...] = ()

    @property
    def config(self) -> dict[str, Any]:
        return self.record["config"]

    @property
    def algorithm(self) -> str:
        return self.config["algorithm"]

    @property
    def mean(self) -> float:
        return self.record["test"]["mean"]

    @property
    def ci95(self) -> float:
        return self.record["test"]["ci95"]

    @property
    def shown_mean(self) -> float:
        """The mean in the unit tables show: percent for accuracy (or error rate), raw for MSE."""
        if self.record.get("metric") != "acc":
            return self.mean
        return 100 * (1 - self.mean) if self.error_rate else 100 * self.mean

    @property
    def shown_ci95(self) -> float:
        return 100 * self.ci95 if self.record.get("metric") == "acc" else self.ci95

    @property
    def paper_difference(self) -> float | None:
        return self.shown_mean - self.paper.value if self.paper else None

    @property
    def budget(self) -> str:
        """Training steps × episodes per step (or × images per mini-batch for batch-trained baselines)."""
        args = self.config.get("dataset_args") or {}
        if args.get("train_mode") == "batches":
            return f"{self.config['steps']} × batch {args.get('batch_size', 'default')}"
        return f"{self.config['steps']} × {self.config['meta_batch']}"

    @property
    def training(self) -> str:
        """How the run trained where a table's protocol does not say: its suite, a training episode shape
        other than the test one, the training-only data options it turned on (e.g. augmentation), the
        hyper-parameters that change the method itself (a ProtoNet temperature), and the
        run whose weights it started from (``init_from``; that run's own row shows its budget)."""
        config = self.config
        parts = [config.get("suite") or "adhoc"]
        shape = [(config.get(f"train_{name}"), config.get(name)) for name in ("ways", "shots", "queries")]
        if any(train is not None and train != tested for train, tested in shape):
            ways, shots, queries = (train if train is not None else tested for train, tested in shape)
            parts.append(f"train {ways}w{shots}s{queries}q")
        args = config.get("dataset_args") or {}
        parts += [name if value is True else f"{name}={value}" for name, value in sorted(args.items())
                  if name in TRAINING_ONLY_ARGS and name not in SHOWN_ELSEWHERE and value not in (False, None)]
        hparams = config.get("hparams") or {}
        parts += [hparam_text(name, hparams[name]) for name in sorted(hparams) if name in METHOD_HPARAMS]
        parts += [hparam_text(name, hparams.get(name, "default")) for name in self.distinguishing]
        if config.get("init_from"):  # a run name: <algorithm>-<dataset>-<setting>-seed<n>-<key>
            source = config["init_from"]
            parts.append(f"backbone from {source.split('-')[0]} run {source.rsplit('-', 1)[-1]}")
        return ", ".join(parts)

    @property
    def train_seconds(self) -> float | None:
        return (self.record.get("train") or {}).get("seconds")

    @property
    def hardware(self) -> str:
        info = self.record.get("hardware") or {}
        devices = self.config.get("devices", 1)
        precision = self.config.get("precision", "32")
        suffix = "" if precision == "32" else f", {precision}"
        if info.get("gpu"):
            return f"{info['gpu']}" + (f" ×{devices}" if devices > 1 else "") + suffix
        cpu = info.get("cpu_model") or info.get("cpu") or "CPU"
        return f"{cpu}, {info.get('torch_threads', '?')} thr" + (f" ×{devices} procs" if devices > 1 else "") + suffix


@dataclass
class Table:
    """All runs evaluated under one protocol, best first."""

    key: tuple
    title: str
    slug: str
    metric: str
    entries: list[Entry] = field(default_factory=list)
    papers: dict[str, PaperNumber] = field(default_factory=dict)  # published numbers of this protocol
    error_rate: bool = False  # accuracy tables of protocols whose papers report error rates show those

    @property
    def references(self) -> dict[str, PaperNumber]:
        """Published numbers of algorithms with no run in this table (e.g. the human reference)."""
        ran = {entry.algorithm for entry in self.entries}
        return {algorithm: number for algorithm, number in self.papers.items() if algorithm not in ran}

    @property
    def higher_is_better(self) -> bool:
        return self.metric == "acc"


@dataclass
class Leaderboard:
    tables: list[Table]
    failed: list[dict[str, Any]]
    problems: list[str]
    citations: dict[str, str]
    record_count: int


# Data-module arguments that change how a model is trained, not which test episodes it sees.
TRAINING_ONLY_ARGS = frozenset({"train_mode", "batch_size", "augmentation", "crop_padding", "download",
                                "normalization", "train_rotations", "affine_augmentation",
                                "train_within_alphabet"})
SHOWN_ELSEWHERE = frozenset({"train_mode", "batch_size", "download"})  # the budget column shows batch training
# Algorithm arguments that change the method, not only its optimisation (shown in the training column).
METHOD_HPARAMS = frozenset({"temperature", "metric", "cosine_scale", "inner_state"})


def hparam_text(name: str, value: Any) -> str:
    """``name value`` for the training column: numbers in short form, booleans as ``true``/``false``."""
    if isinstance(value, bool):
        return f"{name} {str(value).lower()}"
    return f"{name} {value:g}" if isinstance(value, (int, float)) else f"{name} {value}"


def mark_distinguishing_hparams(table: Table) -> None:
    """Where runs of one algorithm and budget would read the same in the training column (e.g. two
    learning rates), show the hyper-parameters in which they differ, so no two rows look alike."""
    groups: dict[tuple[str, str, str], list[Entry]] = {}
    for entry in table.entries:
        groups.setdefault((entry.algorithm, entry.budget, entry.training), []).append(entry)
    for group in groups.values():
        values = [entry.config.get("hparams") or {} for entry in group]
        names = sorted({name for hparams in values for name in hparams} - METHOD_HPARAMS)
        differing = tuple(name for name in names if len({repr(hparams.get(name)) for hparams in values}) > 1)
        for entry in group if len(group) > 1 else ():
            entry.distinguishing = differing


@functools.lru_cache(maxsize=None)
def dataset_defaults(dataset: str) -> tuple[tuple[str, Any], ...]:
    """The protocol arguments of a data module with their defaults (e.g. Omniglot's split="vinyals")."""
    from datamodules import datamodule_class

    try:
        parameters = inspect.signature(datamodule_class(dataset).__init__).parameters.values()
    except Exception:  # an unknown or broken dataset: records still show, grouped by what they state
        return ()
    return tuple((p.name, p.default) for p in parameters
                 if p.default is not inspect.Parameter.empty and p.name not in TRAINING_ONLY_ARGS)


def protocol_arguments(config: dict[str, Any]) -> dict[str, Any]:
    """The run's data-module arguments that decide its test episodes, defaults filled in."""
    given = {k: v for k, v in (config.get("dataset_args") or {}).items() if k not in TRAINING_ONLY_ARGS}
    return {**dict(dataset_defaults(config["dataset"])), **given}


def protocol_key(record: dict[str, Any]) -> tuple:
    """What must be equal for two runs to have seen the identical test episodes."""
    config = record["config"]
    args = tuple(sorted((k, str(v)) for k, v in protocol_arguments(config).items()))
    return (config["dataset"], args, config["ways"], config["shots"], config["queries"], config["test_episodes"],
            record.get("metric"), record["test"]["episodes_sha1"])


def _title_and_slug(key: tuple) -> tuple[str, str]:
    dataset, all_args, ways, shots, queries, episodes, metric, _ = key
    defaults = {k: str(v) for k, v in dataset_defaults(dataset)}
    args = [(k, v) for k, v in all_args if k == "split" or defaults.get(k) != v]  # shown: split and non-defaults
    arguments = ", ".join(f"{k}={v}" for k, v in args)
    score = "accuracy %" if metric == "acc" else f"{str(metric).upper()}, lower is better"
    title = (f"{dataset}{f' ({arguments})' if arguments else ''}: {ways}-way {shots}-shot"
             f" — {queries} queries/class, {episodes} test episodes ({score})")
    slug = "-".join([dataset] + [v if v not in ("True", "False") else k for k, v in args if v != "False"]
                    + [f"{ways}w{shots}s", f"{queries}q", f"{episodes}ep"])
    return title, slug.replace("_", "-").replace("/", "-").lower()


def load_papers(path: Path | None = None) -> dict[str, Any]:
    """The published numbers (see leaderboard/papers.yaml for the format); a bad file gets a clear error."""
    path = Path(path or PAPERS)
    if not path.exists():
        return {"citations": {}, "benchmarks": {}}
    papers = yaml.safe_load(path.read_text()) or {}
    citations, benchmarks = papers.get("citations") or {}, papers.get("benchmarks") or {}
    for name, benchmark in benchmarks.items():
        for setting, algorithms in (benchmark.get("results") or {}).items():
            for algorithm, number in algorithms.items():
                if not isinstance(number, dict) or "value" not in number or number.get("cite") not in citations:
                    raise ValueError(f"{path}: {name}/{setting}/{algorithm} needs {{value: NUMBER, cite: KEY}} "
                                     f"with KEY one of the citations {sorted(citations)}")
    return {"citations": citations, "benchmarks": benchmarks}


def paper_benchmark(papers: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """The papers.yaml benchmark whose ``match`` fits this run's protocol (empty if none)."""
    args = protocol_arguments(config)
    for benchmark in papers["benchmarks"].values():
        match = dict(benchmark.get("match") or {})
        if match.pop("dataset", None) == config["dataset"] and all(args.get(k) == v for k, v in match.items()):
            return benchmark
    return {}


def paper_numbers(papers: dict[str, Any], config: dict[str, Any]) -> dict[str, PaperNumber]:
    """Algorithm -> published number for this run's protocol (dataset, its arguments, setting)."""
    setting = f"{config['ways']}w{config['shots']}s"
    numbers = (paper_benchmark(papers, config).get("results") or {}).get(setting) or {}
    return {algorithm: PaperNumber(float(n["value"]), n["cite"], n.get("note", "")) for algorithm, n in numbers.items()}


def rank_table(table: Table) -> None:
    """Sort best first, number the ranks, and test every entry against the best one (paired)."""
    table.entries.sort(key=lambda e: (-e.mean if table.higher_is_better else e.mean, e.record["name"]))
    best = table.entries[0]
    best_scores = episode_scores(best.record)
    for rank, entry in enumerate(table.entries, start=1):
        entry.rank = rank
        if entry is not best:
            entry.p_vs_best = compare_paired(episode_scores(entry.record), best_scores).p_value


def collect(records_dir: Path, papers: dict[str, Any]) -> Leaderboard:
    """Group the records of ``records_dir`` into ranked tables (see module docstring)."""
    found, problems = scan_records(records_dir)
    tables: dict[tuple, Table] = {}
    failed = []
    for path, record in found.values():
        if record.get("status") != "ok":
            failed.append(record)
            continue
        test = record.get("test") or {}
        if not test.get("episode_scores") or test.get("mean") is None:
            problems.append(f"{path}: status ok but no per-episode test scores; delete it and rerun the run")
            continue
        if not test.get("episodes_sha1"):
            problems.append(f"{path}: no fingerprint of its test episodes (recorded before they were kept), so it "
                            "cannot be paired with other runs; rerun it (make bench FORCE=1 with its suite)")
            continue
        key = protocol_key(record)
        if key not in tables:
            title, slug = _title_and_slug(key)
            error_rate = key[-2] == "acc" and paper_benchmark(papers, record["config"]).get("report") == "error_rate"
            if error_rate:
                title = title.replace("(accuracy %)", "(error rate %, lower is better)")
            tables[key] = Table(key, title + f" · episode set {key[-1][:8]}", slug, record.get("metric") or "acc",
                                papers=paper_numbers(papers, record["config"]), error_rate=error_rate)
        table = tables[key]
        table.entries.append(Entry(record, table.papers.get(record["config"]["algorithm"]), error_rate=table.error_rate))
    slug_counts: dict[str, int] = {}
    for table in tables.values():
        slug_counts[table.slug] = slug_counts.get(table.slug, 0) + 1
    for table in tables.values():  # the same protocol on two episode sets: name the set in the file names
        if slug_counts[table.slug] > 1:
            table.slug += f"-{table.key[-1][:8]}"
    ordered = sorted(tables.values(), key=lambda t: t.slug)
    for table in ordered:
        mark_distinguishing_hparams(table)
        rank_table(table)
    return Leaderboard(ordered, sorted(failed, key=lambda r: r.get("name", "")), problems,
                       papers["citations"], len(found))


def build_leaderboard(records_dir: Path, out_dir: Path, papers_path: Path | None = None,
                      wandb_group: str | None = "leaderboard") -> int:
    """Write README.md, leaderboard.csv, leaderboard.html and plots/ under ``out_dir``; log plots to W&B."""
    from bench.leaderboard_render import render_csv, render_html, render_markdown
    from bench.plots import plot_tables

    board = collect(Path(records_dir), load_papers(papers_path))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = plot_tables(board.tables, out_dir / "plots")
    (out_dir / "README.md").write_text(render_markdown(board, plots, out_dir))
    (out_dir / "leaderboard.csv").write_text(render_csv(board))
    (out_dir / "leaderboard.html").write_text(render_html(board, plots))
    for problem in board.problems:
        print(f"WARNING {problem}", file=sys.stderr)
    print(f"leaderboard: {sum(len(t.entries) for t in board.tables)} runs in {len(board.tables)} table(s), "
          f"{len(board.failed)} failed, {len(board.problems)} problem record(s) -> {out_dir}/README.md, "
          f"leaderboard.csv, leaderboard.html, plots/ ({len(plots)} PNG)")
    if wandb_group and plots:
        from bench.wandb_logging import log_images

        folder = log_images({f"plots/{path.stem}": path for path in plots}, group=wandb_group)
        if folder:
            print(f"leaderboard plots logged to W&B ({folder})")
    return 0
