"""Regression check: a planted regression (MAML inner learning rate x0.01) fails naming MAML; unmodified code passes."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from xml.etree import ElementTree

import pytest
import torch
import yaml

from bench import regress
from bench.config import RunConfig
from bench.records import SCHEMA, kernel_family, write_record

# A miniature ci suite: the regression check's real path (scheduler, runner, records, paired test) in seconds.
MINI_CI = {
    "name": "mini-ci",
    "defaults": {"dataset": "omniglot", "dataset_args": {"split": "vinyals"}, "ways": 5, "shots": 1, "queries": 5,
                 "meta_batch": 2, "steps": 3, "val_episodes": 0, "test_episodes": 60, "eval_batch": 20,
                 "seed": 0, "threads": 1},
    "algorithms": {"protonet": {"hparams": {"hidden": 16}}, "maml": {"hparams": {"hidden": 16}}},
}


def regress_args(tmp_path: Path, **changes) -> argparse.Namespace:
    suite = tmp_path / "mini-ci.yaml"
    suite.write_text(yaml.safe_dump(MINI_CI))
    values = dict(suite=str(suite), baseline=tmp_path / "baseline.json", results=tmp_path / "scratch", update=False,
                  from_records=None, tolerance=None, alpha=regress.ALPHA,
                  throughput_tolerance=regress.THROUGHPUT_TOLERANCE, junit=None, github=False, gpus="none",
                  devices=1, workers=1, in_process=True)
    return argparse.Namespace(**{**values, **changes})


def test_planted_regression_fails_naming_the_algorithm_and_unmodified_code_passes(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert regress.regress_command(regress_args(tmp_path, update=True)) == 0
    written = regress.family_baseline(tmp_path / "baseline.json", kernel_family(torch.device("cpu")))
    baseline = json.loads(written.read_text())  # this machine's kernel family's file
    assert sorted(run["algorithm"] for run in baseline["runs"].values()) == ["maml", "protonet"]
    capsys.readouterr()

    assert regress.regress_command(regress_args(tmp_path)) == 0  # unmodified code: same episodes, same scores
    assert "OK: no significant regression in 2 run(s)" in capsys.readouterr().out

    from tasks.maml import MAML

    monkeypatch.setattr(MAML, "step_size", lambda self: 0.01 * self.inner_lr)  # the planted bug
    junit = tmp_path / "regress.xml"
    assert regress.regress_command(regress_args(tmp_path, junit=junit, github=True)) == 1
    out = capsys.readouterr().out
    assert "REGRESSION: 1 problem(s): maml" in out
    failing = [line for line in out.splitlines() if line.strip().startswith("FAIL")]
    assert len(failing) == 1 and " maml " in failing[0] and "points" in failing[0] and "p=" in failing[0]
    assert "::error title=metabench regress maml::" in out
    assert out.rstrip().splitlines()[-1] == "regress: 1 passed, 1 failed"
    suite = ElementTree.parse(junit).getroot()
    assert suite.get("failures") == "1" and suite.get("tests") == "2"
    failed_cases = [case.get("classname") for case in suite.iter("testcase") if case.find("failure") is not None]
    assert failed_cases == ["regress.maml"]


# -- the comparison on synthetic records (fast, exact) -------------------------------------------------------
FAMILY = "vendor-avx2"  # the kernel family of the synthetic records


def record(algorithm: str, scores: list[float], speed: float = 100.0, status: str = "ok", seed: int = 0,
           episodes_sha1: str = "f" * 16, family: str = FAMILY) -> dict:
    config = RunConfig(algorithm=algorithm, seed=seed, test_episodes=len(scores))
    mean = sum(scores) / len(scores)
    return {"schema": SCHEMA, "status": status, "key": config.key(), "name": config.name, "config": config.to_dict(),
            "metric": "acc", "test": {"mean": mean, "ci95": 0.01, "episode_ids": list(range(len(scores))),
                                      "episode_scores": scores, "episodes_sha1": episodes_sha1},
            "train": {"episodes_per_s": speed},
            "hardware": {"cpu": "test", "kernel_family": family}}


BASE = [0.6 + 0.3 * ((i * 37) % 11) / 10 for i in range(200)]


def test_small_or_insignificant_changes_pass():
    baseline = regress.make_baseline([record("protonet", BASE)], "ci")
    slightly_worse = [s - 0.01 for s in BASE]  # significant (every episode lower) but within tolerance
    findings = regress.compare([record("protonet", slightly_worse)], baseline)
    assert [f.status for f in findings] == ["pass"] and findings[0].p_value < 1e-10
    noisy = [s + (0.05 if i % 2 else -0.05) for i, s in enumerate(BASE)]  # no systematic change
    assert [f.status for f in regress.compare([record("protonet", noisy)], baseline)] == ["pass"]


def test_large_significant_drop_fails_and_throughput_drop_warns():
    baseline = regress.make_baseline([record("protonet", BASE), record("maml", BASE)], "ci")
    findings = regress.compare([record("protonet", BASE, speed=30.0), record("maml", [s - 0.1 for s in BASE])],
                               baseline)
    by_status = {(f.algorithm, f.status) for f in findings}
    assert by_status == {("maml", "fail"), ("protonet", "pass"), ("protonet", "warn")}
    fail = next(f for f in findings if f.status == "fail")
    assert fail.drop == pytest.approx(0.1) and "-10.00 points" in fail.message
    assert regress.failed(findings)


def test_suite_changes_and_failed_runs_are_errors():
    baseline = regress.make_baseline([record("protonet", BASE)], "ci")
    findings = regress.compare([record("maml", BASE), record("protonet", BASE, status="failed")], baseline)
    assert {(f.algorithm, f.status) for f in findings} == {("maml", "error"), ("protonet", "fail")}
    assert "regress-update" in next(f.message for f in findings if f.status == "error")
    missing = regress.compare([], baseline)
    assert [f.status for f in missing] == ["error"] and "missing" in missing[0].message
    with pytest.raises(ValueError, match="failed runs"):
        regress.make_baseline([record("protonet", BASE, status="failed")], "ci")


def test_bad_baseline_file_gets_one_clear_error(tmp_path):
    with pytest.raises(ValueError, match="make regress-update"):
        regress.load_baseline(tmp_path / "absent.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        regress.load_baseline(tmp_path / "broken.json")


def write_suite_record(folder: Path, algorithm: str, scores: list[float], family: str = FAMILY) -> None:
    """A synthetic record of MINI_CI's run of ``algorithm`` (same key), as if run on ``family``."""
    from bench.suite import expand_suite

    config = next(config for config in expand_suite(MINI_CI) if config.algorithm == algorithm)
    write_record(folder / f"{config.name}.json", {**record(algorithm, scores, family=family), "key": config.key(),
                                                  "name": config.name, "config": config.to_dict()})


def test_update_of_chosen_algorithms_keeps_the_other_entries(tmp_path, capsys):
    folder = tmp_path / "records"

    def write(algorithm: str, scores: list[float]) -> None:
        write_suite_record(folder, algorithm, scores)

    write("protonet", BASE)
    write("maml", BASE)
    assert regress.regress_command(regress_args(tmp_path, update=True, from_records=folder, in_process=False)) == 0
    write("protonet", [s - 0.2 for s in BASE])
    write("maml", [s - 0.2 for s in BASE])
    update = regress_args(tmp_path, update=True, from_records=folder, algorithms="protonet")
    assert regress.regress_command(update) == 0
    baseline = json.loads(regress.family_baseline(tmp_path / "baseline.json", FAMILY).read_text())["runs"]
    means = {run["algorithm"]: run["mean"] for run in baseline.values()}
    assert means["protonet"] == pytest.approx(sum(BASE) / len(BASE) - 0.2)  # refreshed
    assert means["maml"] == pytest.approx(sum(BASE) / len(BASE))  # kept
    capsys.readouterr()
    assert regress.regress_command(regress_args(tmp_path, from_records=folder)) == 1
    assert "REGRESSION: 1 problem(s): maml" in capsys.readouterr().out
    assert regress.regress_command(regress_args(tmp_path, from_records=folder, algorithms="protonet")) == 0


def test_runs_tested_on_other_episodes_than_the_baseline_are_errors():
    baseline = regress.make_baseline([record("protonet", BASE)], "ci")
    findings = regress.compare([record("protonet", BASE, episodes_sha1="0" * 16)], baseline)
    assert [f.status for f in findings] == ["error"]
    assert "other episodes" in findings[0].message and "regress-update" in findings[0].message


def test_each_kernel_family_compares_with_its_own_baseline_else_the_shared_one(tmp_path, capsys):
    folder, other = tmp_path / "records", tmp_path / "other"
    write_suite_record(other, "protonet", [s - 0.01 for s in BASE], family="other-x")  # other rounding
    write_suite_record(other, "maml", [s - 0.01 for s in BASE], family="other-x")
    assert regress.regress_command(regress_args(tmp_path, from_records=other, update=True)) == 0
    (tmp_path / "baseline.other-x.json").rename(tmp_path / "baseline.json")  # the shared fallback
    capsys.readouterr()
    write_suite_record(folder, "protonet", BASE)
    write_suite_record(folder, "maml", BASE)
    assert regress.regress_command(regress_args(tmp_path, from_records=folder)) == 0
    assert f"none for this kernel family {FAMILY}" in capsys.readouterr().out

    assert regress.regress_command(regress_args(tmp_path, from_records=folder, update=True)) == 0
    out = capsys.readouterr().out
    own = regress.family_baseline(tmp_path / "baseline.json", FAMILY)
    assert own.name == f"baseline.{FAMILY}.json" and "not refreshed" in out and "baseline.json (commit" in out
    shared = json.loads((tmp_path / "baseline.json").read_text())["runs"].values()
    assert all(run["hardware"]["kernel_family"] == "other-x" for run in shared)  # left as it was
    assert regress.regress_command(regress_args(tmp_path, from_records=folder)) == 0
    assert f"baseline: {own}" in capsys.readouterr().out

    with pytest.raises(ValueError, match="several kernel families"):
        regress.records_family([record("protonet", BASE), record("maml", BASE, family="other-x")])
