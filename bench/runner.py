"""One run: build data module and task from a RunConfig, train, test on the fixed episodes, write a record."""
from __future__ import annotations

import inspect
import math
import resource
import time
import traceback
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from bench.allocator import configure_allocator
from bench.config import RunConfig
from bench.records import SCHEMA, git_state, hardware, now_iso, package_versions, write_record
from bench.table import format_duration
from bench.weights import load_embedding, save_embedding
from datamodules import datamodule_class
from datamodules.base import EpisodicDataModule
from datamodules.episodes import episodes_fingerprint
from tasks import algorithm_class
from tasks.base import EpisodicTask


class TrainTimer(pl.Callback):
    """Training wall time with validation excluded, for an honest episodes/s; keeps the validation curve."""

    def __init__(self) -> None:
        self.fit_seconds = 0.0
        self.validation_seconds = 0.0
        self._fit_start = self._val_start = 0.0
        self.validations: list[dict[str, float]] = []  # {"step": ..., "val/acc": ...} per validation

    def on_fit_start(self, trainer, pl_module) -> None:
        self._fit_start = time.perf_counter()

    def on_fit_end(self, trainer, pl_module) -> None:
        self.fit_seconds = time.perf_counter() - self._fit_start

    def on_validation_start(self, trainer, pl_module) -> None:
        self._val_start = time.perf_counter()

    def on_validation_end(self, trainer, pl_module) -> None:
        self.validation_seconds += time.perf_counter() - self._val_start
        if not trainer.sanity_checking:
            scores = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
            self.validations.append({"step": trainer.global_step, **scores})

    @property
    def train_seconds(self) -> float:
        return max(self.fit_seconds - self.validation_seconds, 1e-9)


class ValidationLine(pl.Callback):
    """One line per validation when progress bars are off (logs, CI, background runs)."""

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        shown = {k: f"{float(v):.4f}" for k, v in trainer.callback_metrics.items() if k.startswith(("val/", "train/"))}
        print(f"[metabench] step {trainer.global_step}: {shown}", flush=True)


HEARTBEAT_SECONDS = 300.0


class Heartbeat(pl.Callback):
    """When progress bars are off, a line every ``interval_s`` seconds of training and of testing: the step
    (test batch), throughput and the time left, so a long background run shows it is alive and when it ends."""

    def __init__(self, total_steps: int, test_batches: int, interval_s: float = 300.0) -> None:
        self.total_steps, self.test_batches, self.interval_s = total_steps, test_batches, interval_s
        self._phase_start = self._last = 0.0
        self._first_step = 0

    def _start(self, trainer) -> None:
        self._phase_start = self._last = time.perf_counter()
        self._first_step = trainer.global_step

    def on_train_start(self, trainer, pl_module) -> None:
        self._start(trainer)

    def on_test_start(self, trainer, pl_module) -> None:
        self._start(trainer)

    def _due(self, trainer) -> float | None:
        now = time.perf_counter()
        if not trainer.is_global_zero or now - self._last < self.interval_s:
            return None
        self._last = now
        return now - self._phase_start

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        elapsed = self._due(trainer)
        if elapsed is None:
            return
        done = trainer.global_step - self._first_step
        left = (self.total_steps - trainer.global_step) * elapsed / max(done, 1)  # validation time included
        loss = trainer.callback_metrics.get("train/loss")
        print(f"[metabench] train step {trainer.global_step}/{self.total_steps} "
              f"({100 * trainer.global_step / self.total_steps:.0f}%), {done / elapsed:.2f} steps/s"
              + (f", loss {float(loss):.4f}" if loss is not None else "") + f", ~{format_duration(left)} left", flush=True)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        elapsed = self._due(trainer)
        if elapsed is None:
            return
        left = (self.test_batches - batch_idx - 1) * elapsed / (batch_idx + 1)
        print(f"[metabench] test batch {batch_idx + 1}/{self.test_batches}, ~{format_duration(left)} left", flush=True)


def batches_to_test(config: RunConfig) -> int:
    """Test batches on one process: the fixed test episodes are sharded over processes, then batched."""
    processes = config.devices * config.num_nodes
    return math.ceil(math.ceil(config.test_episodes / processes) / config.eval_batch)


def build_datamodule(config: RunConfig) -> EpisodicDataModule:
    return datamodule_class(config.dataset)(
        ways=config.ways, shots=config.shots, queries=config.queries,
        train_ways=config.train_ways, train_shots=config.train_shots, train_queries=config.train_queries,
        meta_batch=config.meta_batch, eval_batch=config.eval_batch,
        val_episodes=config.val_episodes, test_episodes=config.test_episodes,
        seed=config.seed, **config.dataset_args,
    )


def build_task(config: RunConfig, datamodule: EpisodicDataModule) -> EpisodicTask:
    """The algorithm, given the dataset-derived arguments its constructor accepts plus ``hparams``."""
    task_class = algorithm_class(config.algorithm)
    accepted = inspect.signature(task_class.__init__).parameters
    derived = dict(datamodule.task_arguments(), ways=config.ways)
    arguments = {k: v for k, v in derived.items() if k in accepted}
    unknown = sorted(set(config.hparams) - set(accepted))
    if unknown:
        raise ValueError(f"{config.algorithm} does not take {unknown}; it takes "
                         f"{sorted(p for p in accepted if p != 'self')}")
    return task_class(**{**arguments, **config.hparams})


def make_trainer(config: RunConfig, callbacks: list[pl.Callback], logger: Any = False,
                 progress: bool = True) -> pl.Trainer:
    return pl.Trainer(
        max_steps=config.steps,
        val_check_interval=min(config.val_every, config.steps) if config.val_episodes else None,
        limit_val_batches=1.0 if config.val_episodes else 0,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        accelerator=config.accelerator,
        devices=config.devices,
        num_nodes=config.num_nodes,
        precision=config.precision,
        strategy="ddp" if config.devices * config.num_nodes > 1 else "auto",
        inference_mode=False,  # gradient-based learners adapt during evaluation
        use_distributed_sampler=False,  # the data module shards episodes itself, exactly
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=progress,
        enable_model_summary=False,
        callbacks=callbacks,
    )


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def run(config: RunConfig, results_dir: Path, logger: Any = False, progress: bool = True) -> dict[str, Any]:
    """Train and test one configuration; write and return its record (status "ok" or "failed")."""
    if config.threads:
        torch.set_num_threads(config.threads)
    started = time.perf_counter()
    record: dict[str, Any] = {
        "schema": SCHEMA, "key": config.key(), "name": config.name, "config": config.to_dict(),
        "seed": config.seed, "git": git_state(), "versions": package_versions(), "created": now_iso(),
        "allocator": configure_allocator(),
    }
    path = Path(results_dir) / f"{config.name}.json"
    try:
        pl.seed_everything(config.seed, workers=True, verbose=False)
        datamodule = build_datamodule(config)
        datamodule.setup("fit")
        task = build_task(config, datamodule)
        if config.init_from:
            record["init"] = load_embedding(task, results_dir, config.init_from)
        timer = TrainTimer()
        callbacks: list[pl.Callback] = [timer] if progress else [timer, ValidationLine(),
                                                                     Heartbeat(config.steps, batches_to_test(config), HEARTBEAT_SECONDS)]
        trainer = make_trainer(config, callbacks, logger=logger, progress=progress)
        trainer.fit(task, datamodule=datamodule)
        final_loss = _metric(trainer, "train/loss")  # read before test() replaces the callback metrics
        trainer.test(task, datamodule=datamodule, verbose=False)
        device = task.device
        # Throughput unit: episodes, or images for algorithms trained on ordinary batches (Baseline).
        batches = getattr(datamodule, "train_mode", "episodes") == "batches"
        unit, per_step = ("images", datamodule.batch_size) if batches else ("episodes", config.meta_batch)
        episodes_trained = trainer.global_step * per_step * trainer.world_size
        record.update({
            "status": "ok",
            "metric": task.score_name,
            "test": {**task.test_summary, "episodes_sha1": episodes_fingerprint(datamodule.episodes["test"])},
            "train": {"steps": trainer.global_step, "unit": unit, "episodes": episodes_trained,
                      "seconds": timer.train_seconds, "episodes_per_s": episodes_trained / timer.train_seconds,
                      "final_loss": final_loss, "validations": timer.validations},
            "hardware": hardware(device),
            "peak_memory_bytes": peak_memory_bytes(device),
            "execution": task.execution,
        })
        if not trainer.is_global_zero:
            return record
        if config.save_weights:
            record["weights"] = save_embedding(task, results_dir, config.name).relative_to(results_dir).as_posix()
    except Exception as error:  # a failed run is recorded with its error, never silently dropped
        record.update({"status": "failed", "error": f"{type(error).__name__}: {error}",
                       "traceback": traceback.format_exc()})
        record["wall_time_s"] = time.perf_counter() - started
        write_record(path, record)
        raise
    record["wall_time_s"] = time.perf_counter() - started
    write_record(path, record)
    return record


def _metric(trainer: pl.Trainer, name: str) -> float | None:
    value = trainer.callback_metrics.get(name)
    return float(value) if value is not None else None
