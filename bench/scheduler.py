"""The scheduler: a suite's pending runs over a pool of device slots; resumable, and safe to start twice.

* **Slots.** ``GPUS=0,1,2,3`` gives one slot per GPU (``DEVICES=2``: one slot per pair, each run
  trained with DDP on its pair); every run process sees only its slot's GPUs (``CUDA_VISIBLE_DEVICES``).
  Without GPUs, ``workers`` CPU slots share the cores (torch threads split evenly between them).
* **Resume.** A run whose record exists with status "ok" (looked up by run key, the hash of its
  resolved config) is skipped, so rerunning an interrupted suite finishes it; ``force`` redoes runs.
* **Claims.** Before starting a run the scheduler takes an exclusive ``flock`` on
  ``<results>/.scheduler/<key>.lock`` and hands that lock to the run's process. The kernel drops the
  lock when the last holder dies (even on ``kill -9``), so a second scheduler on the same suite never
  runs a claimed run at the same time: it runs other runs and waits for the claimed ones, then
  finds their records. Records themselves are written atomically by :func:`bench.records.write_record`.
* **Order.** A run initialised from another run of the suite (``init_from``) waits until that run has
  finished; the others fill the slots meanwhile.
* **Failures.** A failing run gets a "failed" record with its error (the runner writes it; the
  scheduler writes it when the process died without one) and the other runs go on.
"""
from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, TextIO

from bench.config import RunConfig
from bench.records import SCHEMA, CorruptRecordError, now_iso, read_record, scan_records, write_record
from bench.table import format_duration

REPO = Path(__file__).resolve().parent.parent
WORK_DIR = ".scheduler"  # locks, run configs and logs, inside the results folder (git-ignored)


@dataclass(frozen=True)
class Slot:
    """Where one run executes: its accelerator, the devices of one (DDP) run, threads and environment."""

    name: str
    accelerator: str
    devices: int = 1
    threads: int | None = None
    env: dict[str, str] = field(default_factory=dict)

    def apply(self, config: RunConfig) -> RunConfig:
        """``config`` placed on this slot (execution fields only: the run key does not change).

        A thread count the suite sets is kept (CPU results depend on it, e.g. for the regression baseline).
        """
        return dataclasses.replace(config, accelerator=self.accelerator, devices=self.devices,
                                   threads=config.threads or self.threads)


def parse_gpus(gpus: str | None) -> list[str]:
    """GPU ids from ``"0,1,2,3"``; ``"none"``/``"cpu"`` -> none; ``None``/``""``/``"auto"`` -> every visible GPU."""
    text = (gpus or "auto").strip().lower()
    if text in ("none", "cpu"):
        return []
    if text == "auto":
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    ids = [part.strip() for part in text.split(",") if part.strip()]
    bad = [part for part in ids if not part.isdigit()]
    if bad or len(set(ids)) != len(ids):
        raise ValueError(f"GPUS={gpus!r}: give distinct GPU numbers separated by commas (e.g. GPUS=0,1,2,3), "
                         "'auto' for every visible GPU, or 'none' for CPU")
    return ids


def device_slots(gpu_ids: list[str], devices: int = 1, workers: int | None = 1, cpu_count: int | None = None,
                 runs: int | None = None) -> list[Slot]:
    """The slots of a device pool.

    With GPUs: ``len(gpu_ids) // devices`` slots of ``devices`` GPUs each. Without: ``workers`` CPU
    slots, each run using ``devices`` processes (DDP over gloo when > 1) and an even share of the cores.
    ``workers=None`` (auto) gives one slot per core, at most one per run (``runs``): a Conv-4 run on one
    thread is faster per core than on two, so parallel one-thread runs finish a suite soonest.
    """
    cores = cpu_count or os.cpu_count() or 1
    if workers is None:
        workers = max(1, min(cores // max(devices, 1), runs or cores))
    if devices < 1 or workers < 1:
        raise ValueError(f"DEVICES and WORKERS must be at least 1 (got DEVICES={devices}, WORKERS={workers})")
    if gpu_ids:
        if len(gpu_ids) % devices:
            raise ValueError(f"{len(gpu_ids)} GPUs ({','.join(gpu_ids)}) cannot be split into groups of "
                             f"DEVICES={devices}; use a DEVICES that divides the number of GPUs")
        groups = [gpu_ids[i:i + devices] for i in range(0, len(gpu_ids), devices)]
        return [Slot(f"gpu{'+'.join(group)}", "gpu", devices, None, {"CUDA_VISIBLE_DEVICES": ",".join(group)})
                for group in groups]
    threads = max(1, cores // (workers * devices))
    env = {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    return [Slot(f"cpu{index}", "cpu", devices, threads, env) for index in range(workers)]


# -- claims --------------------------------------------------------------------------------------------
class RunLock:
    """An exclusive, non-blocking ``flock`` on one run key; released when every holder has closed it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None

    def acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self.fd = fd
        return True

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


# -- launching runs ---------------------------------------------------------------------------------------
@dataclass
class Job:
    """One run as the scheduler launches it."""

    config: RunConfig
    slot: Slot
    results: Path
    lock: RunLock
    started: float = 0.0  # perf_counter, for durations
    previous: tuple[int, int] | None = None  # identity of the record file before this attempt

    def record_identity(self) -> tuple[int, int] | None:
        """(inode, mtime) of the record file: an atomic rewrite always changes the inode."""
        try:
            stat = self.record_path.stat()
        except FileNotFoundError:
            return None
        return stat.st_ino, stat.st_mtime_ns

    def fresh_record(self) -> dict[str, Any] | None:
        """The record this attempt wrote (valid, any status), or None if it wrote none."""
        identity = self.record_identity()
        if identity is None or identity == self.previous:
            return None
        try:
            return read_record(self.record_path)
        except (CorruptRecordError, FileNotFoundError):
            return None

    @property
    def record_path(self) -> Path:
        return self.results / f"{self.config.name}.json"

    @property
    def log_path(self) -> Path:
        return self.results / WORK_DIR / f"{self.config.name}.log"


class Handle(Protocol):
    def poll(self) -> int | None: ...

    def kill(self) -> None: ...


class Launcher(Protocol):
    def start(self, job: Job) -> Handle: ...


class SubprocessLauncher:
    """Each run in its own ``python -m bench run`` process, with the slot's environment and the run's lock."""

    def start(self, job: Job) -> subprocess.Popen:
        config = job.slot.apply(job.config)
        config_path = job.results / WORK_DIR / f"{config.name}.config.json"
        config_path.write_text(json.dumps(config.to_dict(), indent=1, sort_keys=True))
        env = {**os.environ, **job.slot.env,
               "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        command = [sys.executable, "-m", "bench", "run", "--config", str(config_path),
                   "--results", str(job.results), "--no-progress"]
        with open(job.log_path, "w") as log:  # same working directory: relative paths mean the same
            return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, pass_fds=(job.lock.fd,))


@dataclass
class FinishedHandle:
    """A run that already finished (in-process launches)."""

    returncode: int

    def poll(self) -> int:
        return self.returncode

    def kill(self) -> None:
        pass


class InProcessLauncher:
    """Runs each run inside the scheduler's process, one at a time (debugging, tests, planted regressions)."""

    def __init__(self, execute: Callable[[RunConfig, Path], Any] | None = None) -> None:
        self.execute = execute

    def start(self, job: Job) -> FinishedHandle:
        if self.execute is None:
            from bench.wandb_logging import run_with_wandb

            self.execute = lambda config, results: run_with_wandb(config, results, progress=False)
        try:
            self.execute(job.slot.apply(job.config), job.results)
        except Exception as error:  # the runner has written the failed record; keep going
            job.log_path.write_text(f"{type(error).__name__}: {error}\n")
            return FinishedHandle(1)
        return FinishedHandle(0)


# -- progress ---------------------------------------------------------------------------------------------
class Progress:
    """Runs done / running / failed and an ETA on one line (rewritten on a terminal), plus event lines."""

    def __init__(self, total: int, slots: int, stream: TextIO | None = None, label: str = "metabench") -> None:
        self.total, self.slots, self.label = total, slots, label
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.durations: list[float] = []
        self._last = self._last_counts = ""
        self._last_time = 0.0

    def event(self, message: str) -> None:
        if self.tty and self._last:
            self.stream.write("\r\033[K")
        self.stream.write(f"[{self.label}] {message}\n")
        self._last = ""
        self.stream.flush()

    def eta(self, waiting: int, running_elapsed: list[float]) -> float | None:
        if not self.durations:
            return None
        mean = sum(self.durations) / len(self.durations)
        left = waiting * mean + sum(max(mean - elapsed, 0.0) for elapsed in running_elapsed)
        return left / max(1, self.slots)

    def status(self, done: int, skipped: int, failed: int, running_elapsed: list[float], waiting: int,
               held: int) -> None:
        eta = self.eta(waiting + held, running_elapsed)
        line = (f"{done + skipped + failed}/{self.total} finished ({done} done, {skipped} skipped, {failed} failed), "
                f"{len(running_elapsed)} running, {waiting} waiting"
                + (f", {held} held by another scheduler" if held else "")
                + (f", ETA {format_duration(eta)}" if eta is not None and (waiting or running_elapsed) else ""))
        if line == self._last:
            return
        if self.tty:
            self.stream.write(f"\r\033[K[{self.label}] {line}")
        else:  # a log file: a line when the counts change, else at most one a minute
            counts = line.split(", ETA")[0]
            if counts == self._last_counts and time.monotonic() - self._last_time < 60:
                return
            self._last_counts, self._last_time = counts, time.monotonic()
            self.stream.write(f"[{self.label}] {line}\n")
        self._last = line
        self.stream.flush()


# -- the scheduler ----------------------------------------------------------------------------------------
@dataclass
class SuiteOutcome:
    """What a scheduler invocation did: records of finished runs and the names of failed ones."""

    records: list[dict[str, Any]] = field(default_factory=list)
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def completed_record(path: Path) -> dict[str, Any] | None:
    """The record at ``path`` if it is a valid, successful one."""
    try:
        record = read_record(path)
    except (CorruptRecordError, FileNotFoundError):
        return None
    return record if record.get("status") == "ok" else None


class Scheduler:
    """Runs ``configs`` over ``slots`` (see module docstring); :meth:`run` returns a :class:`SuiteOutcome`."""

    def __init__(self, configs: list[RunConfig], results: Path, slots: list[Slot], launcher: Launcher | None = None,
                 force: bool = False, poll_seconds: float = 0.2, stream: TextIO | None = None, label: str = "metabench") -> None:
        if not slots:
            raise ValueError("the device pool is empty: give GPUS or at least one CPU worker")
        keys = [config.key() for config in configs]
        if len(set(keys)) != len(keys):
            raise ValueError("the suite lists the same run twice (identical resolved configs); remove the duplicate")
        self.configs, self.results, self.slots = configs, Path(results), slots
        self.names = {config.name for config in configs}
        self.launcher = launcher or SubprocessLauncher()
        self.force, self.poll_seconds = force, poll_seconds
        self.progress = Progress(len(configs), len(slots), stream, label)

    def _lock(self, config: RunConfig) -> RunLock:
        return RunLock(self.results / WORK_DIR / f"{config.key()}.lock")

    def run(self) -> SuiteOutcome:
        (self.results / WORK_DIR).mkdir(parents=True, exist_ok=True)
        outcome = SuiteOutcome()
        existing, outcome.problems = scan_records(self.results)
        for problem in outcome.problems:
            self.progress.event(f"WARNING {problem}")
        waiting: deque[RunConfig] = deque()
        for config in self.configs:
            path, record = existing.get(config.key(), (None, None))
            if record is not None and record.get("status") == "ok" and not self.force:
                outcome.skipped.append(config.name)
                outcome.records.append(record)
            else:
                waiting.append(config)
        if outcome.skipped:
            self.progress.event(f"{len(outcome.skipped)} run(s) already have a record: skipped (--force to redo)")
        held: list[RunConfig] = []
        running: dict[str, tuple[Job, Handle]] = {}
        try:
            while waiting or held or running:
                self._fill_slots(waiting, held, running, outcome)
                for slot_name, (job, handle) in list(running.items()):
                    code = handle.poll()
                    if code is not None:
                        del running[slot_name]
                        self._finish(job, code, outcome)
                now = time.perf_counter()
                self.progress.status(len(outcome.done), len(outcome.skipped), len(outcome.failed),
                                     [now - job.started for job, _ in running.values()], len(waiting), len(held))
                if running or held:
                    time.sleep(self.poll_seconds)
        except BaseException:
            for job, handle in running.values():
                handle.kill()
                job.lock.release()
            raise
        return outcome

    def _fill_slots(self, waiting: deque[RunConfig], held: list[RunConfig], running: dict, outcome: SuiteOutcome) -> None:
        """Start claimable runs on free slots; runs claimed by another scheduler wait in ``held``."""
        for slot in self.slots:
            if slot.name in running:
                continue
            job = self._claim_next(waiting, held, slot, outcome)
            if job is None:
                return
            self.progress.event(f"start {job.config.name} on {slot.name} (log: {job.log_path})")
            job.started, job.previous = time.perf_counter(), job.record_identity()
            try:
                running[slot.name] = (job, self.launcher.start(job))
            except Exception as error:
                self._record_failure(job, f"could not start the run: {type(error).__name__}: {error}", outcome)
                job.lock.release()

    def _claim_next(self, waiting: deque[RunConfig], held: list[RunConfig], slot: Slot,
                    outcome: SuiteOutcome) -> Job | None:
        """The first waiting (then held) run this scheduler can claim; runs claimed elsewhere move to ``held``."""
        for queue in (waiting, held):
            for config in list(queue):
                if self._waits_for_pretraining(config, outcome):
                    continue
                lock = self._lock(config)
                if not lock.acquire():
                    if queue is waiting:
                        waiting.remove(config)
                        held.append(config)
                    continue
                queue.remove(config)
                job = Job(config, slot, self.results, lock)
                record = None if self.force else completed_record(job.record_path)
                if record is None:
                    return job
                lock.release()  # finished meanwhile by another scheduler
                outcome.skipped.append(config.name)
                outcome.records.append(record)
                self.progress.event(f"{config.name}: finished by another scheduler, skipped")
        return None

    def _waits_for_pretraining(self, config: RunConfig, outcome: SuiteOutcome) -> bool:
        """A run initialised from another run of this suite (``init_from``) starts once that run has finished."""
        finished = (*outcome.done, *outcome.skipped, *outcome.failed)
        return config.init_from in self.names and config.init_from not in finished

    def _finish(self, job: Job, code: int, outcome: SuiteOutcome) -> None:
        """Account for a finished run process: done if it left an "ok" record, failed otherwise."""
        seconds = time.perf_counter() - job.started
        try:
            record = job.fresh_record()
            self.progress.durations.append(seconds)
            if record is not None and record.get("status") == "ok":
                outcome.done.append(job.config.name)
                outcome.records.append(record)
                score = (record.get("test") or {}).get("mean")
                self.progress.event(f"done  {job.config.name} in {format_duration(seconds)}"
                                    + (f" ({record.get('metric', 'score')} {score:.4f})" if score is not None else ""))
                return
            if record is None:
                error = (f"the run process exited with code {code} without writing its record"
                         + (" (killed by a signal)" if code < 0 else ""))
                self._write_failed_record(job, error)
                record = read_record(job.record_path)
            outcome.failed.append(job.config.name)
            outcome.records.append(record)
            self.progress.event(f"FAILED {job.config.name}: {record.get('error')} (log: {job.log_path})")
        finally:
            job.lock.release()

    def _record_failure(self, job: Job, error: str, outcome: SuiteOutcome) -> None:
        self._write_failed_record(job, error)
        outcome.failed.append(job.config.name)
        outcome.records.append(read_record(job.record_path))
        self.progress.event(f"FAILED {job.config.name}: {error}")

    @staticmethod
    def _write_failed_record(job: Job, error: str) -> None:
        write_record(job.record_path, {
            "schema": SCHEMA, "status": "failed", "key": job.config.key(), "name": job.config.name,
            "config": job.config.to_dict(), "seed": job.config.seed, "created": now_iso(), "error": error,
            "log": str(job.log_path),
        })
