"""W&B logging: a real tiny run logs offline, and its run folder holds the metrics, config and record summary."""
from __future__ import annotations

import json

import pytest

from bench.config import RunConfig
from bench.report import build_report, report_command, sync_offline_runs
from bench.wandb_logging import (log_images, make_logger, offline_runs, record_summary, run_with_wandb,
                                 wait_for_offline_run, wandb_mode)

TINY = dict(algorithm="protonet", dataset="omniglot", dataset_args={"split": "lake"}, ways=5, shots=1, queries=5,
            meta_batch=2, steps=2, val_episodes=0, test_episodes=10, eval_batch=10, seed=0, suite="wbtest",
            threads=1, hparams={"hidden": 16})


@pytest.fixture
def offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    monkeypatch.setenv("WANDB_PROJECT", "metabench-test")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc: no key
    return tmp_path / "wb"


def test_offline_run_folder_holds_metrics_config_and_record_summary(offline, tmp_path):
    config = RunConfig(**TINY)
    record = run_with_wandb(config, tmp_path / "results", progress=False)
    folders = offline_runs(offline)
    assert len(folders) == 1
    run = wait_for_offline_run(folders[0])
    assert (run["project"], run["group"], run["name"]) == ("metabench-test", "wbtest", config.name)
    assert run["job_type"] == "omniglot-lake-5w1s" and "protonet" in run["tags"]
    assert run["config"]["run_key"] == config.key() and run["config"]["run"]["algorithm"] == "protonet"
    assert run["config"]["hidden"] == 16  # the task's hyper-parameters, through Lightning's log_hyperparams
    summary = run["summary"]
    assert run["exit_code"] == 0 and summary["status"] == "ok" and summary["run_key"] == config.key()
    assert summary["test/mean"] == pytest.approx(record["test"]["mean"])
    assert summary["test/episodes"] == 10 and summary["train/steps"] == 2
    assert any(row.get("test/acc") == pytest.approx(record["test"]["mean"]) for row in run["history"])
    tables = list(folders[0].glob("files/media/table/test/episode_scores_*.table.json"))
    assert len(tables) == 1
    table = json.loads(tables[0].read_text())
    assert table["columns"] == ["episode_id", "acc"]
    assert [row[0] for row in table["data"]] == record["test"]["episode_ids"]
    assert [row[1] for row in table["data"]] == pytest.approx(record["test"]["episode_scores"])


def test_failed_run_is_logged_as_failed(offline, tmp_path):
    config = RunConfig(**{**TINY, "hparams": {"no_such_argument": 1}})
    with pytest.raises(ValueError, match="does not take"):
        run_with_wandb(config, tmp_path / "results", progress=False)
    summary = wait_for_offline_run(offline_runs(offline)[0])["summary"]
    assert summary["status"] == "failed" and "no_such_argument" in summary["error"]
    assert wait_for_offline_run(offline_runs(offline)[0])["exit_code"] == 1


def test_disabled_mode_logs_nothing_and_bad_mode_is_named(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert make_logger(RunConfig(algorithm="protonet")) is None
    assert log_images({"x": tmp_path / "x.png"}, group="g") is None
    assert not (tmp_path / "wandb").exists()
    monkeypatch.setenv("WANDB_MODE", "sometimes")
    with pytest.raises(ValueError, match="WANDB_MODE='sometimes'"):
        wandb_mode()


def test_online_without_a_key_logs_offline_instead(offline, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "online")
    logger = make_logger(RunConfig(algorithm="protonet"))
    assert logger is not None and wandb_mode() == "offline"
    assert "no W&B API key" in capsys.readouterr().err


def test_leaderboard_plots_are_logged_as_images(offline, tmp_path):
    folder = log_images({"plots/scores": _png(tmp_path)}, group="quick")
    run = wait_for_offline_run(folder)
    assert run["job_type"] == "leaderboard" and run["group"] == "quick"
    assert run["summary"]["plots/scores/_type"] == "image-file"
    assert list(folder.glob("files/media/images/plots/scores_*.png"))


def test_record_summary_is_flat_and_scalar():
    record = {"status": "ok", "key": "k", "metric": "acc", "test": {"mean": 0.9, "episode_scores": [1.0]},
              "train": {"seconds": 3.0}, "hardware": {"cpu": "x"}}
    assert record_summary(record) == {"status": "ok", "run_key": "k", "metric": "acc", "test/mean": 0.9,
                                      "train/seconds": 3.0, "hardware/cpu": "x"}


def test_sync_and_report_explain_what_is_missing_offline(offline, tmp_path, capsys):
    assert sync_offline_runs() == 0  # nothing to upload
    log_images({"p": _png(tmp_path)}, group="g")
    assert sync_offline_runs() == 1
    assert "no W&B API key" in capsys.readouterr().err
    assert report_command("quick", tmp_path / "records") == 0
    assert "leaderboard.html" in capsys.readouterr().out


def test_report_definition_builds(monkeypatch):
    monkeypatch.setenv("WANDB_PROJECT", "metabench")
    report = build_report("quick", "someone", "| a |\n|---|\n| 1 |")
    assert report.title == "metabench: suite quick" and report.project == "metabench"
    grid = report.blocks[-1]
    assert "quick" in grid.runsets[0].filters and len(grid.panels) == 3


def _png(folder):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = folder / "scores.png"
    figure = plt.figure(figsize=(2, 2))
    figure.savefig(path)
    plt.close(figure)
    return path
