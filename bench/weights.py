"""Embedding-network weights handed from one run to another: pre-train, then train episodically.

A run with ``save_weights`` writes its embedding network (the task's :meth:`~tasks.base.EpisodicTask.embedding_network`)
to ``<results>/weights/<run name>.pt`` after training; a run with ``init_from: <run name>`` starts its own
embedding network from that file. This is the two-stage recipe of Chen et al. 2021 ("Meta-Baseline: Exploring
Simple Meta-Learning for Few-Shot Learning"): a classifier over all training classes first, then episodic
(ProtoNet-style) training of the same backbone; Triantafillou et al. 2020 ("Meta-Dataset") start fo-MAML from
such a backbone too. The receiving run records the file's SHA-1.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch

from tasks.base import EpisodicTask

WEIGHTS_DIR = "weights"
# BatchNorm buffers a pre-trained network has and a batch-statistics one (MAML's, track_running_stats=False)
# lacks: they are dropped on loading, as that network never reads them.
RUNNING_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")


def weights_path(results: Path, run_name: str) -> Path:
    return Path(results) / WEIGHTS_DIR / f"{run_name}.pt"


def save_embedding(task: EpisodicTask, results: Path, run_name: str) -> Path:
    """Write ``task``'s embedding network (on CPU) atomically; returns the file."""
    path = weights_path(results, run_name)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().cpu() for name, tensor in task.embedding_network().state_dict().items()}
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save({"run": run_name, "algorithm": type(task).__name__, "state_dict": state}, temporary)
    os.replace(temporary, path)
    return path


def load_embedding(task: EpisodicTask, results: Path, run_name: str) -> dict[str, Any]:
    """Initialise ``task``'s embedding network from run ``run_name``'s saved weights; returns provenance
    (``{"from": run_name, "weights_sha1": ...}``) for the record. One clear error when the file is missing
    or its network does not fit."""
    path = weights_path(results, run_name)
    if not path.is_file():
        raise FileNotFoundError(
            f"init_from: no saved weights of run {run_name!r} at {path}. Run it first with save_weights "
            f"(in a suite, name its algorithm in init_from and the suite saves them), or rerun it with --force "
            f"if its record exists but the weights file was deleted")
    data = path.read_bytes()
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        state = saved["state_dict"]
    except Exception as error:
        raise ValueError(f"init_from: {path} is not a weights file this harness wrote "
                         f"({type(error).__name__} on loading it); "
                         f"rerun {run_name!r} with --force to write it again") from error
    network = task.embedding_network()
    own = network.state_dict()
    unused_statistics = sorted(name for name in set(state) - set(own) if name.rsplit(".", 1)[-1] in RUNNING_STATISTICS)
    state = {name: tensor for name, tensor in state.items() if name not in unused_statistics}
    mismatched = sorted(set(own) ^ set(state)) + sorted(
        name for name in set(own) & set(state) if own[name].shape != state[name].shape)
    if mismatched:
        raise ValueError(
            f"init_from: the embedding network of run {run_name!r} ({saved.get('algorithm')}) does not fit this "
            f"run's {type(network).__name__} (differing parameters: {mismatched[:4]}...); use the same "
            f"backbone settings (hidden, image size, channels) in both runs")
    network.load_state_dict(state)
    provenance = {"from": run_name, "weights_sha1": hashlib.sha1(data).hexdigest()}
    if unused_statistics:
        provenance["batchnorm_running_statistics"] = "dropped: this run normalises with batch statistics"
    return provenance
