"""The scheduler: device pools, slot assignment, failure isolation, resume, claims; kill -9 and two schedulers.

The logic tests use fake device lists and a fake launcher that writes records instantly; the last
two tests start real ``python -m bench suite`` processes on tiny real Omniglot runs.
"""
from __future__ import annotations

import io
import multiprocessing
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

import pytest
import yaml

from bench.config import RunConfig
from bench.records import SCHEMA, read_record, scan_records, write_record
from bench.scheduler import WORK_DIR, Job, RunLock, Scheduler, device_slots, parse_gpus
from bench.suite import expand_suite

REPO = Path(__file__).resolve().parent.parent


def configs(count: int) -> list[RunConfig]:
    return [RunConfig(algorithm="protonet", seed=seed, steps=2, test_episodes=4, suite="fake") for seed in range(count)]


def fake_record(config: RunConfig, status: str = "ok") -> dict:
    record = {"schema": SCHEMA, "status": status, "key": config.key(), "name": config.name,
              "config": config.to_dict(), "metric": "acc"}
    if status == "ok":
        record["test"] = {"mean": 0.5, "ci95": 0.1, "episodes": 2, "episode_ids": [0, 1], "episode_scores": [0.4, 0.6]}
    else:
        record["error"] = "RuntimeError: planted failure"
    return record


class FakeHandle:
    def __init__(self, launcher: "FakeLauncher", slot: str, polls: int, code: int) -> None:
        self.launcher, self.slot, self.polls, self.code = launcher, slot, polls, code

    def poll(self):
        self.polls -= 1
        if self.polls > 0:
            return None
        self.launcher.busy.discard(self.slot)
        return self.code

    def kill(self) -> None:
        pass


class FakeLauncher:
    """Writes the run's record at start; the run 'lasts' a few polls. Checks one run per slot at a time."""

    def __init__(self, fail: set[int] = frozenset(), crash: set[int] = frozenset()) -> None:
        self.fail, self.crash = fail, crash
        self.started: list[tuple[str, str, dict]] = []  # (run name, slot name, applied config)
        self.busy: set[str] = set()

    def start(self, job: Job) -> FakeHandle:
        assert job.slot.name not in self.busy, f"two runs at once on {job.slot.name}"
        assert job.lock.fd is not None, "a run is started without holding its claim"
        self.busy.add(job.slot.name)
        applied = job.slot.apply(job.config)
        self.started.append((job.config.name, job.slot.name, applied.to_dict()))
        seed = job.config.seed
        if seed not in self.crash:  # a crashed process writes nothing
            write_record(job.record_path, fake_record(job.config, "failed" if seed in self.fail else "ok"))
        code = -9 if seed in self.crash else (1 if seed in self.fail else 0)
        return FakeHandle(self, job.slot.name, polls=1 + seed % 3, code=code)


def schedule(runs, results, slots, launcher, force=False):
    stream = io.StringIO()
    outcome = Scheduler(runs, results, slots, launcher, force=force, poll_seconds=0.0, stream=stream).run()
    return outcome, stream.getvalue()


# -- device pools --------------------------------------------------------------------------------------
def test_gpu_pool_one_run_per_gpu_or_per_ddp_group():
    slots = device_slots(parse_gpus("0,1,2,3"))
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in slots] == ["0", "1", "2", "3"]
    assert all(s.accelerator == "gpu" and s.devices == 1 for s in slots)
    pairs = device_slots(parse_gpus("4,5,6,7"), devices=2)
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in pairs] == ["4,5", "6,7"] and pairs[0].devices == 2
    config = pairs[1].apply(RunConfig(algorithm="maml"))
    assert (config.accelerator, config.devices) == ("gpu", 2)
    assert config.key() == RunConfig(algorithm="maml").key()  # placement never changes the run key
    with pytest.raises(ValueError, match="groups of DEVICES=3"):
        device_slots(parse_gpus("0,1,2,3"), devices=3)
    for bad in ("0,0", "gpu1", "0;1"):
        with pytest.raises(ValueError, match="GPUS="):
            parse_gpus(bad)
    assert parse_gpus("none") == [] and parse_gpus("cpu") == []


def test_cpu_pool_splits_threads():
    slots = device_slots([], workers=3, cpu_count=8)
    assert [s.name for s in slots] == ["cpu0", "cpu1", "cpu2"]
    assert all(s.threads == 2 and s.env["OMP_NUM_THREADS"] == "2" and s.env["CUDA_VISIBLE_DEVICES"] == ""
               for s in slots)
    assert device_slots([], workers=4, cpu_count=2)[0].threads == 1
    assert slots[0].apply(RunConfig(algorithm="maml")).threads == 2
    assert slots[0].apply(RunConfig(algorithm="maml", threads=1)).threads == 1  # a suite's pinned count wins
    assert device_slots([], workers=1, devices=2, cpu_count=8)[0].threads == 4  # DDP processes share the slot
    with pytest.raises(ValueError, match="at least 1"):
        device_slots([], workers=0)


def test_auto_workers_one_thread_run_per_core_at_most_one_per_run():
    assert [(s.name, s.threads) for s in device_slots([], workers=None, cpu_count=2, runs=2)] == \
        [("cpu0", 1), ("cpu1", 1)]
    assert [(s.name, s.threads) for s in device_slots([], workers=None, cpu_count=2, runs=1)] == [("cpu0", 2)]
    assert len(device_slots([], workers=None, cpu_count=8, devices=2, runs=10)) == 4


# -- scheduling logic ------------------------------------------------------------------------------------
def test_runs_spread_over_free_slots_and_all_finish(tmp_path):
    runs = configs(10)
    launcher = FakeLauncher()
    outcome, log = schedule(runs, tmp_path, device_slots(parse_gpus("0,1,2,3")), launcher)
    assert sorted(outcome.done) == sorted(c.name for c in runs) and not outcome.failed
    assert {slot for _, slot, _ in launcher.started} == {"gpu0", "gpu1", "gpu2", "gpu3"}
    assert [name for name, _, _ in launcher.started[:4]] == [c.name for c in runs[:4]]  # suite order
    assert all(applied["accelerator"] == "gpu" and applied["devices"] == 1 for _, _, applied in launcher.started)
    assert "10/10 finished (10 done" in log and "ETA" in log


def test_a_failing_run_does_not_stop_the_others(tmp_path):
    runs = configs(6)
    outcome, log = schedule(runs, tmp_path, device_slots([], workers=2, cpu_count=2),
                            FakeLauncher(fail={1}, crash={4}))
    assert sorted(outcome.failed) == sorted([runs[1].name, runs[4].name])
    assert sorted(outcome.done) == sorted(c.name for i, c in enumerate(runs) if i not in (1, 4))
    assert read_record(tmp_path / f"{runs[1].name}.json")["error"] == "RuntimeError: planted failure"
    crashed = read_record(tmp_path / f"{runs[4].name}.json")
    assert crashed["status"] == "failed" and "killed by a signal" in crashed["error"]
    assert f"FAILED {runs[4].name}" in log


def test_resume_skips_finished_runs_by_key_and_force_redoes(tmp_path):
    runs = configs(5)
    slots = device_slots([], workers=2, cpu_count=2)
    schedule(runs, tmp_path, slots, FakeLauncher(fail={2}))
    second = FakeLauncher()
    outcome, log = schedule(runs, tmp_path, slots, second)
    assert [name for name, _, _ in second.started] == [runs[2].name]  # only the failed run is redone
    assert len(outcome.skipped) == 4 and outcome.done == [runs[2].name]
    assert "4 run(s) already have a record" in log
    # the key decides, not the file name: a renamed record still counts
    (tmp_path / f"{runs[0].name}.json").rename(tmp_path / f"renamed-{runs[0].key()}.json")
    third = FakeLauncher()
    schedule(runs, tmp_path, slots, third)
    assert third.started == []
    forced = FakeLauncher()
    schedule(runs, tmp_path, slots, forced, force=True)
    assert len(forced.started) == 5


def test_corrupt_record_is_reported_and_its_run_redone(tmp_path):
    runs = configs(2)
    (tmp_path / f"{runs[0].name}.json").write_text('{"schema": 1, "status": "ok", "ke')
    launcher = FakeLauncher()
    outcome, log = schedule(runs, tmp_path, device_slots([], cpu_count=1), launcher)
    assert len(outcome.problems) == 1 and runs[0].name in outcome.problems[0] and "WARNING" in log
    assert [name for name, _, _ in launcher.started] == [runs[0].name, runs[1].name]
    assert scan_records(tmp_path)[1] == []


def test_run_claimed_by_another_scheduler_is_waited_for_not_duplicated(tmp_path):
    runs = configs(3)
    other = RunLock(tmp_path / WORK_DIR / f"{runs[1].key()}.lock")
    assert other.acquire()
    launcher = FakeLauncher()
    result = {}
    worker = threading.Thread(target=lambda: result.update(out=schedule(runs, tmp_path, device_slots([], cpu_count=1),
                                                                        launcher)))
    worker.start()
    deadline = time.time() + 10
    while len(launcher.started) < 2 and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)
    assert worker.is_alive(), "the scheduler must wait for a run another scheduler holds"
    write_record(tmp_path / f"{runs[1].name}.json", fake_record(runs[1]))  # the other scheduler finishes it
    other.release()
    worker.join(10)
    outcome, log = result["out"]
    assert [name for name, _, _ in launcher.started] == [runs[0].name, runs[2].name]
    assert runs[1].name in outcome.skipped and "held by another scheduler" in log


def test_a_run_initialised_from_another_waits_for_it_while_others_run(tmp_path):
    pretraining = RunConfig(algorithm="baseline", steps=2, suite="fake", save_weights=True)
    episodic = RunConfig(algorithm="protonet", steps=2, suite="fake", init_from=pretraining.name)
    runs = [episodic, *configs(2), pretraining]  # the dependent run first: order alone would start it first

    class CheckingLauncher(FakeLauncher):
        def start(self, job: Job) -> FakeHandle:
            if job.config.init_from:
                running = {name for name, slot, _ in self.started if slot in self.busy}
                assert pretraining.name not in running and (job.results / f"{pretraining.name}.json").exists()
            return super().start(job)

    launcher = CheckingLauncher()
    outcome, _ = schedule(runs, tmp_path, device_slots([], workers=2, cpu_count=2), launcher)
    order = [name for name, _, _ in launcher.started]
    assert sorted(outcome.done) == sorted(c.name for c in runs) and not outcome.failed
    assert order.index(pretraining.name) < order.index(episodic.name) and order[0] != episodic.name


def test_duplicate_runs_in_a_suite_are_refused(tmp_path):
    with pytest.raises(ValueError, match="same run twice"):
        Scheduler(configs(2) + configs(1), tmp_path, device_slots([], cpu_count=1))


# -- real processes ----------------------------------------------------------------------------------------
# The schedulers are forked from this process (no second interpreter start-up) and run the real CLI
# code; every run is a real `python -m bench run` process on tiny real Omniglot runs.
TINY_SUITE = {
    "name": "tiny",
    "defaults": {"dataset": "omniglot", "dataset_args": {"split": "lake"}, "ways": 5, "shots": 1, "queries": 5,
                 "meta_batch": 2, "steps": 3, "val_episodes": 0, "test_episodes": 10, "eval_batch": 10,
                 "threads": 1},
    "grid": {"seed": [0, 1, 2]},
    "algorithms": {"protonet": {"hparams": {"hidden": 16}}},
}


def _scheduler_process(argv: list[str], log: str) -> None:
    os.setsid()  # its own process group: kill -9 of the group takes the scheduler and its runs
    os.environ["WANDB_MODE"] = "disabled"
    os.environ["PYTHONPATH"] = str(REPO)
    from bench.cli import main

    with open(log, "w", buffering=1) as stream:
        sys.stdout = sys.stderr = stream
        try:
            code = main(argv)
        except BaseException:
            traceback.print_exc(file=stream)
            code = 3
        stream.flush()
        os._exit(code)


def start_scheduler(suite: Path, results: Path, workers: int, log: Path) -> multiprocessing.Process:
    argv = ["suite", str(suite), "--results", str(results), "--gpus", "none", "--workers", str(workers)]
    process = multiprocessing.get_context("fork").Process(target=_scheduler_process, args=(argv, str(log)))
    process.start()
    return process


@pytest.fixture
def tiny_suite(tmp_path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY_SUITE))
    return path


def assert_complete(results: Path) -> None:
    """Every run of the tiny suite has exactly one valid, successful record and nothing else is there."""
    keys = {config.key() for config in expand_suite(TINY_SUITE)}
    found, problems = scan_records(results)
    assert problems == []
    assert set(found) == keys and all(record["status"] == "ok" for _, record in found.values())
    assert len(list(results.glob("*.json"))) == len(keys)


def held_locks(results: Path) -> int:
    held = 0
    for path in (results / WORK_DIR).glob("*.lock"):
        lock = RunLock(path)
        if lock.acquire():
            lock.release()
        else:
            held += 1
    return held


def test_kill_9_mid_suite_then_rerun_finishes_with_one_record_per_run(tiny_suite, tmp_path):
    results = tmp_path / "results"
    process = start_scheduler(tiny_suite, results, workers=1, log=tmp_path / "first.log")
    deadline = time.time() + 240
    while time.time() < deadline and process.is_alive():
        finished = len(scan_records(results)[0]) if results.exists() else 0
        if finished >= 1 and held_locks(results) >= 1:  # one run done, the next one in flight
            break
        time.sleep(0.1)
    assert process.is_alive(), "the suite ended before it could be killed:\n" + (tmp_path / "first.log").read_text()
    os.killpg(process.pid, signal.SIGKILL)  # the scheduler and its run processes
    process.join(30)
    deadline = time.time() + 10
    while held_locks(results) and time.time() < deadline:  # the kernel drops dead processes' claims
        time.sleep(0.05)
    assert held_locks(results) == 0
    before, problems = scan_records(results)
    assert 1 <= len(before) < 3 and problems == []

    rerun = start_scheduler(tiny_suite, results, workers=2, log=tmp_path / "rerun.log")
    rerun.join(300)
    log = (tmp_path / "rerun.log").read_text()
    assert rerun.exitcode == 0, log[-3000:]
    assert f"{len(before)} run(s) already have a record: skipped" in log
    assert_complete(results)
    for path, record in scan_records(results)[0].values():
        if record["key"] in before:  # finished before the kill: kept, not redone
            assert record["created"] == before[record["key"]][1]["created"]


def test_two_schedulers_on_one_suite_share_the_work_without_duplicates(tiny_suite, tmp_path):
    results = tmp_path / "results"
    logs = [tmp_path / f"scheduler{i}.log" for i in range(2)]
    processes = [start_scheduler(tiny_suite, results, workers=1, log=log) for log in logs]
    for process in processes:
        process.join(300)
    texts = [log.read_text() for log in logs]
    assert [process.exitcode for process in processes] == [0, 0], texts
    assert_complete(results)
    for config in expand_suite(TINY_SUITE):
        starts = sum(text.count(f"start {config.name} ") for text in texts)
        assert starts == 1, f"{config.name} was started {starts} times"


# -- the shipped suites ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(path.stem for path in (REPO / "bench" / "suites").glob("*.yaml")))
def test_shipped_suites_expand_into_runs_their_code_accepts(name):
    """Every suite loads, and every run's hparams / dataset_args are arguments of its algorithm / data module."""
    import inspect

    from bench.suite import load_suite
    from datamodules import datamodule_class
    from tasks import algorithm_class

    runs = load_suite(name)
    assert runs and len({run.key() for run in runs}) == len(runs)
    for run in runs:
        task_args = inspect.signature(algorithm_class(run.algorithm).__init__).parameters
        assert set(run.hparams) <= set(task_args), (run.name, sorted(set(run.hparams) - set(task_args)))
        data_class = datamodule_class(run.dataset)
        data_args = {p for cls in data_class.__mro__ if "__init__" in vars(cls)
                     for p in inspect.signature(cls.__init__).parameters}
        assert set(run.dataset_args) <= data_args, (run.name, sorted(set(run.dataset_args) - data_args))


def test_a_suite_can_be_narrowed_to_some_settings_with_the_same_keys():
    from bench.suite import load_suite

    everything = load_suite("omniglot-cpu")
    narrowed = load_suite("omniglot-cpu", ["maml", "anil"], ["20w1s", "5w5s"])
    expected = [c for c in everything if c.algorithm in ("maml", "anil") and c.setting in ("20w1s", "5w5s")]
    assert [c.key() for c in narrowed] == [c.key() for c in expected] and len(narrowed) == 4
    with pytest.raises(ValueError, match=r"no setting\(s\) \['20w2s'\].*'5w1s'"):
        load_suite("omniglot-cpu", settings=["20w2s"])


def test_a_suite_can_be_rerun_at_other_seeds_and_its_own_seed_keeps_its_key(capsys):
    from bench.cli import main
    from bench.suite import load_suite

    shipped = load_suite("omniglot-cpu", ["protonet"], ["5w1s"])
    seeded = load_suite("omniglot-cpu", ["protonet"], ["5w1s"], seeds=[0, 1, 2, 1])
    assert [c.seed for c in seeded] == [0, 1, 2] and seeded[0].key() == shipped[0].key()
    assert len({c.key() for c in seeded}) == 3
    recipes = {RunConfig.semantic_hash(c.to_dict(), ignore=("seed",)) for c in seeded}
    assert len(recipes) == 1  # one recipe: the leaderboard shows its spread over the three seeds
    with pytest.raises(ValueError, match="non-negative integers"):
        load_suite("omniglot-cpu", seeds=[-1])
    with pytest.raises(SystemExit):
        main(["suite", "omniglot-cpu", "--seeds", "a,b", "--dry-run"])
    assert "give comma-separated non-negative integers" in capsys.readouterr().err
