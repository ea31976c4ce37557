"""Regression check: run the ``ci`` suite and compare every run with the committed baseline.

Each run is matched with the baseline run of the same key (hash of its resolved config) and compared
on the identical fixed test episodes with a paired test (:mod:`bench.stats`). A run *regresses* when
its mean test score dropped by more than the tolerance AND the paired test says the drop is
significant (p < alpha): accuracy may not fall by more than 0.02 (2 points, absolute); MSE may not
rise by more than 10% (relative). A training-throughput drop beyond a generous tolerance (50%; CI
machines are noisy and shared) is only a warning. Runs without a baseline (the suite changed) and
baseline runs without a fresh run are errors, and so is a run tested on other episodes than its
baseline (their fingerprints differ): ``make regress-update`` rewrites the baseline, deliberately.

Baselines are kept per *kernel family* (:func:`bench.records.kernel_family`: CPU vendor and instruction
set, or GPU): on CPU a run is bit-identical on every machine of its family, while across families
rounding differences, amplified by training, move the 200-episode ci scores by up to ~2 points. So
``make regress-update`` writes ``ci.<family>.json`` for the machine it runs on, and ``make regress``
compares with the file of its own family, falling back to ``ci.json`` (made on another family) when
there is none.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import torch

from bench.records import git_state, kernel_family, now_iso, scan_records, write_record
from bench.stats import TEST_NAME, compare_paired, episode_scores, scores_by_episode

DEFAULT_BASELINE = Path("leaderboard/baselines/ci.json")
TOLERANCE = {"acc": 0.02, "mse": 0.10}  # acc: absolute drop; mse: relative rise
ALPHA = 0.01
THROUGHPUT_TOLERANCE = 0.5


@dataclass
class Finding:
    """The verdict on one run: "pass", "fail" (regression), "error" (cannot compare) or "warn"."""

    name: str
    algorithm: str
    status: str
    message: str
    p_value: float | None = None
    drop: float | None = None


def baseline_entry(record: dict[str, Any]) -> dict[str, Any]:
    """What the baseline keeps of a record: its scores per episode, mean, throughput and hardware."""
    test = record["test"]
    return {"name": record["name"], "algorithm": record["config"]["algorithm"], "metric": record["metric"],
            "mean": test["mean"], "ci95": test["ci95"], "episodes_sha1": test.get("episodes_sha1"),
            "episode_ids": test["episode_ids"],
            "episode_scores": test["episode_scores"], "episodes_per_s": record["train"]["episodes_per_s"],
            "hardware": record.get("hardware"), "config": record["config"]}


def make_baseline(records: list[dict[str, Any]], suite: str) -> dict[str, Any]:
    failed = [r.get("name", r["key"]) for r in records if r.get("status") != "ok"]
    if failed:
        raise ValueError(f"cannot write a baseline from failed runs {failed}; fix them first")
    made_at = {json.dumps(r.get("git"), sort_keys=True) for r in records if r.get("git")}
    git = json.loads(made_at.pop()) if len(made_at) == 1 else git_state()  # the code the runs ran, when known
    return {"suite": suite, "created": now_iso(), "git": git, "test": TEST_NAME,
            "runs": {r["key"]: baseline_entry(r) for r in sorted(records, key=lambda r: r["name"])}}


def family_baseline(path: Path, family: str) -> Path:
    """The baseline file of one kernel family next to ``path``: ``ci.json`` -> ``ci.<family>.json``."""
    return path.with_name(f"{path.stem}.{family}{path.suffix}")


def records_family(records: list[dict[str, Any]]) -> str:
    """The kernel family the records were computed on (this machine's CPU family for older records)."""
    families = {(r.get("hardware") or {}).get("kernel_family") for r in records} - {None}
    if len(families) > 1:
        raise ValueError(f"the records come from several kernel families {sorted(families)}: "
                         "compare (or update from) one machine's records at a time")
    return families.pop() if families else kernel_family(torch.device("cpu"))


def baseline_to_compare(path: Path, family: str) -> Path:
    """This family's baseline when committed, else ``path`` itself (the fallback, made on another family)."""
    own = family_baseline(path, family)
    return own if own.exists() else path


def other_baselines(path: Path, written: Path) -> list[str]:
    """The other families' baselines next to ``written``, each with the commit it was made at (not refreshed)."""
    found = []
    for other in sorted({path, *path.parent.glob(f"{path.stem}.*{path.suffix}")} - {written}):
        if other.exists():
            commit = (load_baseline(other).get("git") or {}).get("commit") or "?"
            found.append(f"{other.name} (commit {commit[:7]})")
    return found


def load_baseline(path: Path) -> dict[str, Any]:
    try:
        baseline = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"no regression baseline at {path}: create it with `make regress-update`") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}): recreate it with `make regress-update`") from None
    if not isinstance(baseline, dict) or not isinstance(baseline.get("runs"), dict):
        raise ValueError(f"{path} has no 'runs' mapping: recreate it with `make regress-update`")
    return baseline


def score_drop(metric: str, baseline_mean: float, current_mean: float) -> float:
    """How much worse the current mean is, in the tolerance's unit (accuracy: absolute; MSE: relative)."""
    if metric == "acc":
        return baseline_mean - current_mean
    return (current_mean - baseline_mean) / max(abs(baseline_mean), 1e-12)


def describe_drop(metric: str, baseline_mean: float, current_mean: float, tolerance: float) -> str:
    if metric == "acc":
        return (f"accuracy {100 * current_mean:.2f}% vs baseline {100 * baseline_mean:.2f}% "
                f"({100 * (current_mean - baseline_mean):+.2f} points; tolerance -{100 * tolerance:.1f})")
    return (f"{metric} {current_mean:.4g} vs baseline {baseline_mean:.4g} "
            f"({100 * (current_mean / max(abs(baseline_mean), 1e-12) - 1):+.1f}%; tolerance +{100 * tolerance:.0f}%)")


def compare_run(record: dict[str, Any], base: dict[str, Any], tolerance: float | None, alpha: float,
                throughput_tolerance: float) -> list[Finding]:
    """The findings of one fresh run against its baseline entry."""
    name, algorithm = record.get("name", record["key"]), record["config"]["algorithm"]
    if record.get("status") != "ok":
        return [Finding(name, algorithm, "fail", f"the run failed: {record.get('error', '?')}")]
    sha1, base_sha1 = (record.get("test") or {}).get("episodes_sha1"), base.get("episodes_sha1")
    if sha1 != base_sha1:
        return [Finding(name, algorithm, "error",
                        f"tested on other episodes than the baseline (fingerprint {sha1} vs {base_sha1}): the "
                        "sampler or data changed, so scores cannot be paired; run `make regress-update` and review")]
    metric = record.get("metric") or "acc"
    limit = TOLERANCE.get(metric, 0.02) if tolerance is None else tolerance
    comparison = compare_paired(episode_scores(record), scores_by_episode(base["episode_ids"], base["episode_scores"]))
    drop = score_drop(metric, comparison.mean_b, comparison.mean_a)
    text = (f"{describe_drop(metric, comparison.mean_b, comparison.mean_a, limit)}, "
            f"p={comparison.p_value:.2g} on {comparison.episodes} paired episodes")
    regressed = drop > limit and comparison.p_value < alpha
    findings = [Finding(name, algorithm, "fail" if regressed else "pass", text, comparison.p_value, drop)]
    current_speed, base_speed = (record.get("train") or {}).get("episodes_per_s"), base.get("episodes_per_s")
    if current_speed and base_speed and current_speed < (1 - throughput_tolerance) * base_speed:
        findings.append(Finding(name, algorithm, "warn",
                                f"training throughput {current_speed:.1f} episodes/s vs baseline {base_speed:.1f} "
                                f"({100 * (current_speed / base_speed - 1):+.0f}%; warning below "
                                f"-{100 * throughput_tolerance:.0f}%; baseline hardware: "
                                f"{(base.get('hardware') or {}).get('gpu') or (base.get('hardware') or {}).get('cpu')})"))
    return findings


def compare(records: list[dict[str, Any]], baseline: dict[str, Any], tolerance: float | None = None,
            alpha: float = ALPHA, throughput_tolerance: float = THROUGHPUT_TOLERANCE) -> list[Finding]:
    """Findings for every fresh run and every baseline run (see module docstring)."""
    findings: list[Finding] = []
    current = {record["key"]: record for record in records}
    for key, record in sorted(current.items(), key=lambda item: item[1].get("name", item[0])):
        base = baseline["runs"].get(key)
        if base is None:
            findings.append(Finding(record.get("name", key), record["config"]["algorithm"], "error",
                                    "no baseline for this run (the ci suite changed?): run `make regress-update`"))
            continue
        findings += compare_run(record, base, tolerance, alpha, throughput_tolerance)
    for key, base in sorted(baseline["runs"].items(), key=lambda item: item[1]["name"]):
        if key not in current:
            findings.append(Finding(base["name"], base["algorithm"], "error",
                                    "baseline run missing from the fresh results (the ci suite changed?): "
                                    "run `make regress-update`"))
    return findings


def failed(findings: list[Finding]) -> bool:
    return any(f.status in ("fail", "error") for f in findings)


def text_report(findings: list[Finding], alpha: float) -> str:
    labels = {"pass": "ok  ", "fail": "FAIL", "error": "ERR ", "warn": "warn"}
    lines = [f"regression check ({TEST_NAME}; a run fails when its drop exceeds the tolerance and p < {alpha}):"]
    lines += [f"  {labels[f.status]} {f.algorithm:<11} {f.name}: {f.message}" for f in findings]
    bad = [f for f in findings if f.status in ("fail", "error")]
    warnings = sum(f.status == "warn" for f in findings)
    if bad:
        lines.append(f"REGRESSION: {len(bad)} problem(s): " + ", ".join(sorted({f.algorithm for f in bad})))
    else:
        lines.append(f"OK: no significant regression in {sum(f.status == 'pass' for f in findings)} run(s)"
                     + (f", {warnings} throughput warning(s)" if warnings else ""))
    return "\n".join(lines)


def junit_xml(findings: list[Finding], seconds: float) -> str:
    """JUnit XML: one test case per run; regressions as failures, errors as errors, warnings as output."""
    runs: dict[str, list[Finding]] = {}
    for finding in findings:
        runs.setdefault(finding.name, []).append(finding)
    suite = ElementTree.Element("testsuite", name="metabench-regress", tests=str(len(runs)),
                                failures=str(sum(any(f.status == "fail" for f in fs) for fs in runs.values())),
                                errors=str(sum(any(f.status == "error" for f in fs) for fs in runs.values())),
                                time=f"{seconds:.1f}")
    for name, group in runs.items():
        case = ElementTree.SubElement(suite, "testcase", classname=f"regress.{group[0].algorithm}", name=name)
        for finding in group:
            if finding.status in ("fail", "error"):
                tag = "failure" if finding.status == "fail" else "error"
                ElementTree.SubElement(case, tag, message=finding.message).text = finding.message
        ElementTree.SubElement(case, "system-out").text = "\n".join(f"{f.status}: {f.message}" for f in group)
    return ElementTree.tostring(suite, encoding="unicode", xml_declaration=True)


def github_annotations(findings: list[Finding]) -> str:
    kinds = {"fail": "error", "error": "error", "warn": "warning"}
    return "\n".join(f"::{kinds[f.status]} title=metabench regress {f.algorithm}::{f.name}: {f.message}"
                     for f in findings if f.status in kinds)


def clear_scratch(folder: Path) -> None:
    """Empty a scratch results folder of records and scheduler files (nothing else is touched)."""
    for path in folder.glob("*.json"):
        path.unlink()
    shutil.rmtree(folder / ".scheduler", ignore_errors=True)


def fresh_records(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The ci suite's records: run now into the emptied scratch folder, or read from ``--from-records``."""
    from bench.cli import make_scheduler
    from bench.suite import load_suite

    configs = load_suite(args.suite, chosen_algorithms(args))
    wanted = {config.key() for config in configs}
    if args.from_records:
        found, problems = scan_records(args.from_records)
        for problem in problems:
            print(f"WARNING {problem}", file=sys.stderr)
        return [record for key, (_, record) in found.items() if key in wanted]
    clear_scratch(args.results)
    outcome = make_scheduler(configs, args.results, args, label=f"regress {args.suite}").run()
    return outcome.records


def chosen_algorithms(args: argparse.Namespace) -> list[str] | None:
    return [a for a in (getattr(args, "algorithms", "") or "").split(",") if a] or None


def restricted(baseline: dict[str, Any], algorithms: list[str] | None, keep: bool) -> dict[str, Any]:
    """The baseline with only (``keep=True``) or without (``keep=False``) the runs of ``algorithms``."""
    if not algorithms:
        return baseline if keep else {**baseline, "runs": {}}
    runs = {key: run for key, run in baseline["runs"].items() if (run["algorithm"] in algorithms) == keep}
    return {**baseline, "runs": runs}


def regress_command(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    algorithms = chosen_algorithms(args)
    records = fresh_records(args)
    seconds = time.perf_counter() - started
    family = records_family(records)
    if args.update:  # with --algorithms, only their entries are replaced
        target = family_baseline(args.baseline, family)
        previous = baseline_to_compare(args.baseline, family)
        kept = restricted(load_baseline(previous), algorithms, keep=False)["runs"] if algorithms else {}
        baseline = make_baseline(records, args.suite)
        baseline["runs"] = dict(sorted({**kept, **baseline["runs"]}.items(), key=lambda item: item[1]["name"]))
        write_record(target, baseline)
        print(f"baseline {target} (kernel family {family}) rewritten from {len(records)} run(s) of suite "
              f"{args.suite!r}" + (f" (algorithms {', '.join(algorithms)}; other entries kept)" if algorithms else "")
              + f" ({seconds:.0f}s); review and commit it")
        others = other_baselines(args.baseline, target)
        if others:
            print("not refreshed (other kernel families; rerun there if the change is meant to move scores): "
                  + ", ".join(others))
        return 0
    path = baseline_to_compare(args.baseline, family)
    print(f"baseline: {path}" + ("" if path != args.baseline else
                                 f" (none for this kernel family {family}: rounding differs across families)"))
    baseline = restricted(load_baseline(path), algorithms, keep=True)
    findings = compare(records, baseline, args.tolerance, args.alpha, args.throughput_tolerance)
    print(text_report(findings, args.alpha))
    print(f"(suite {args.suite!r}: {len(records)} run(s) in {seconds:.0f}s)")
    if args.junit:
        args.junit.parent.mkdir(parents=True, exist_ok=True)
        args.junit.write_text(junit_xml(findings, seconds))
        print(f"JUnit XML: {args.junit}")
    if args.github:
        print(github_annotations(findings))
    print(closing_line(findings))
    return 1 if failed(findings) else 0


def closing_line(findings: list[Finding]) -> str:
    """The plain count line CI systems read: runs without and with a regression (or error)."""
    bad = {f.name for f in findings if f.status in ("fail", "error")}
    return f"regress: {len({f.name for f in findings} - bad)} passed, {len(bad)} failed"
