"""Weights & Biases logging of runs, through Lightning's ``WandbLogger``.

W&B is a logger, never a dependency of correctness: offline by default (``WANDB_MODE=offline``, no
key, no network; runs land in ``$WANDB_DIR/wandb/offline-run-*``), ``WANDB_MODE=disabled`` turns it
off, ``WANDB_MODE=online`` logs live. Each run is named like its record; its project is
``$WANDB_PROJECT`` (default "metabench"), its group the suite, its job type the evaluation table it
belongs to (dataset-split-setting). The run config, the final record summary and the per-episode test
scores (a ``wandb.Table``) are attached when the run ends, failed or not.

:func:`read_offline_run` / :func:`wait_for_offline_run` read an offline run folder back (its ``.wandb`` transaction log) without
any network, so tests and ``make wandb-sync`` can see what a run holds.
"""
from __future__ import annotations

import json
import netrc
import os
import socket
import struct
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from bench.config import RunConfig
from bench.records import CorruptRecordError, read_record

REPO = Path(__file__).resolve().parent.parent
DEFAULT_PROJECT = "metabench"
MODES = ("offline", "online", "disabled")


def wandb_mode() -> str:
    """The W&B mode from ``WANDB_MODE`` (default offline); a bad value gets one clear error."""
    mode = os.environ.get("WANDB_MODE", "offline").strip().lower() or "offline"
    mode = {"dryrun": "offline", "run": "online"}.get(mode, mode)
    if mode not in MODES:
        raise ValueError(f"WANDB_MODE={mode!r}: use one of {', '.join(MODES)}")
    return mode


def wandb_root() -> Path:
    """The folder W&B writes under (its ``wandb/`` subfolder): ``$WANDB_DIR``, else the repository."""
    return Path(os.environ.get("WANDB_DIR") or REPO)


def project_name() -> str:
    return os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT


def table_name(config: dict[str, Any]) -> str:
    """The evaluation table a run belongs to: dataset, its arguments, and the setting (e.g. omniglot-vinyals-5w1s)."""
    args = config.get("dataset_args") or {}
    parts = [config["dataset"]] + [str(v) if v is not True else k for k, v in sorted(args.items())
                                    if v not in (False, None)]
    return "-".join(parts + [f"{config['ways']}w{config['shots']}s"])


def api_host() -> str:
    return urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname or "api.wandb.ai"


def has_api_key() -> bool:
    """A key in ``WANDB_API_KEY`` or in ~/.netrc for the W&B host (where ``wandb login`` puts it)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators(api_host()) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def can_reach(host: str, timeout: float = 5.0) -> bool:
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def online_problem() -> str | None:
    """Why W&B cannot be reached from here, or None when a key and the network are present."""
    if not has_api_key():
        return "no W&B API key: set WANDB_API_KEY or run `.venv/bin/wandb login`"
    if not can_reach(api_host()):
        return f"cannot reach {api_host()}:443 (no network?)"
    return None


def make_logger(config: RunConfig):
    """A ``WandbLogger`` for ``config``, or None when ``WANDB_MODE=disabled`` (online without key or network: offline)."""
    mode = wandb_mode()
    if mode == "disabled":
        return None
    if mode == "online":
        problem = online_problem()
        if problem:  # a result never depends on W&B: log offline, sync later
            print(f"W&B: {problem}; logging this run offline instead (upload later with `make wandb-sync`)",
                  file=sys.stderr)
            mode = "offline"
    from pytorch_lightning.loggers import WandbLogger

    os.environ["WANDB_MODE"] = mode
    os.environ.setdefault("WANDB_SILENT", "true")  # no banner per run: the record and the scheduler say enough
    root = wandb_root()
    root.mkdir(parents=True, exist_ok=True)
    return WandbLogger(
        name=config.name, project=project_name(), save_dir=str(root), group=config.suite,
        job_type=table_name(config.to_dict()), tags=[config.algorithm, config.dataset, config.setting],
        config={"run": config.to_dict(), "run_key": config.key()},
    )


def record_summary(record: dict[str, Any]) -> dict[str, Any]:
    """The scalar part of a record, flattened for a W&B summary (no per-episode lists)."""
    test, train = record.get("test") or {}, record.get("train") or {}
    summary = {"status": record.get("status"), "run_key": record.get("key"), "metric": record.get("metric"),
               "wall_time_s": record.get("wall_time_s"), "peak_memory_bytes": record.get("peak_memory_bytes"),
               "error": record.get("error")}
    summary.update({f"test/{k}": v for k, v in test.items() if not isinstance(v, list)})
    summary.update({f"train/{k}": v for k, v in train.items()})
    summary.update({f"hardware/{k}": v for k, v in (record.get("hardware") or {}).items()})
    return {k: v for k, v in summary.items() if v is not None}


def attach_record(logger, record: dict[str, Any]) -> None:
    """Put the record's summary and per-episode test scores on the logger's run, then finish the run."""
    from pytorch_lightning.utilities import rank_zero_only

    if getattr(rank_zero_only, "rank", 0) != 0:
        return
    experiment = logger.experiment
    experiment.summary.update(record_summary(record))
    test = record.get("test") or {}
    if test.get("episode_ids"):
        rows = [[int(i), float(s)] for i, s in zip(test["episode_ids"], test["episode_scores"])]
        logger.log_table("test/episode_scores", columns=["episode_id", record.get("metric") or "score"], data=rows)
    experiment.finish(exit_code=0 if record.get("status") == "ok" else 1)


def run_with_wandb(config: RunConfig, results_dir: Path, progress: bool = True) -> dict[str, Any]:
    """:func:`bench.runner.run` with a W&B logger (unless disabled), finished with the run's record."""
    from bench.runner import run

    logger = make_logger(config)
    record = None
    try:
        record = run(config, results_dir, logger=logger or False, progress=progress)
        return record
    finally:
        if logger is not None:
            if record is None:  # failed: the runner wrote the failed record before raising
                try:
                    record = read_record(Path(results_dir) / f"{config.name}.json")
                except (CorruptRecordError, FileNotFoundError):
                    record = {"status": "failed", "key": config.key()}
            attach_record(logger, record)


def log_images(images: dict[str, Path], group: str, job_type: str = "leaderboard") -> Path | None:
    """Log PNG files as ``wandb.Image`` s in one run (the leaderboard plots); returns its folder."""
    if wandb_mode() == "disabled" or not images:
        return None
    import wandb

    os.environ.setdefault("WANDB_SILENT", "true")
    root = wandb_root()
    root.mkdir(parents=True, exist_ok=True)
    run = wandb.init(project=project_name(), group=group, job_type=job_type, name=f"{group}-{job_type}",
                     dir=str(root), mode=wandb_mode())
    run.log({key: wandb.Image(str(path)) for key, path in images.items()})
    folder = Path(run.dir).parent
    run.finish()
    return folder


# -- reading offline runs back --------------------------------------------------------------------------
BLOCK = 32768
HEADER = 7  # ":W&B" magic, 2-byte magic number, 1-byte version


def _log_payloads(path: Path) -> list[bytes]:
    """The records of a ``.wandb`` file: a LevelDB-style log of 32 KiB blocks of checksummed chunks."""
    data = Path(path).read_bytes()
    if not data.startswith(b":W&B"):
        raise ValueError(f"{path} is not a W&B transaction log")
    payloads, pending, offset = [], b"", HEADER
    while offset + 7 <= len(data):
        room = BLOCK - offset % BLOCK
        if room < 7:  # a chunk header never straddles blocks: the rest of the block is padding
            offset += room
            continue
        _, length, kind = struct.unpack("<IHB", data[offset:offset + 7])
        chunk = data[offset + 7:offset + 7 + length]
        offset += 7 + length
        if kind == 0 and length == 0:
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):  # full or last chunk: a whole record
            payloads.append(pending)
            pending = b""
    return payloads


def read_offline_run(folder: Path) -> dict[str, Any]:
    """Config, summary, history rows and run metadata of an offline run folder, from its ``.wandb`` log."""
    from wandb.proto import wandb_internal_pb2 as pb

    logs = sorted(Path(folder).glob("run-*.wandb"))
    if not logs:
        raise FileNotFoundError(f"{folder}: no run-*.wandb file; is it a W&B run folder?")
    run: dict[str, Any] = {"config": {}, "summary": {}, "history": [], "folder": str(folder), "complete": False}

    def items(update) -> dict[str, Any]:
        return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in update}

    for payload in _log_payloads(logs[0]):
        message = pb.Record()
        message.ParseFromString(payload)
        kind = message.WhichOneof("record_type")
        if kind == "run":
            info = message.run
            run.update(name=info.display_name, project=info.project, group=info.run_group, job_type=info.job_type,
                       tags=list(info.tags))
            run["config"].update(items(info.config.update))
        elif kind == "config":
            run["config"].update(items(message.config.update))
        elif kind == "history":
            run["history"].append(items(message.history.item))
        elif kind == "summary":
            run["summary"].update(items(message.summary.update))
        elif kind == "exit":
            run["complete"], run["exit_code"] = True, message.exit.exit_code
    return run


def wait_for_offline_run(folder: Path, timeout: float = 30.0) -> dict[str, Any]:
    """:func:`read_offline_run` once W&B has written the run's exit record (its writer flushes after ``finish``)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            run = read_offline_run(folder)
        except (FileNotFoundError, ValueError):
            run = None
        if run is not None and run["complete"]:
            return run
        if time.monotonic() > deadline:
            raise TimeoutError(f"{folder}: the W&B run log has no exit record after {timeout:.0f}s")
        time.sleep(0.1)


def offline_runs(root: Path | None = None) -> list[Path]:
    """Offline run folders under ``root/wandb`` (default :func:`wandb_root`), oldest first."""
    return sorted((Path(root or wandb_root()) / "wandb").glob("offline-run-*"))
