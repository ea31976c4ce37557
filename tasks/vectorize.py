"""Loop or ``torch.func.vmap`` over the tasks of a meta-batch: chosen by measuring both, once.

Which is faster depends on the device and the shapes: on a GPU, vmap turns a meta-batch into a few
large kernels instead of many small launches; on a CPU, Conv-4 runs faster task by task (each task's
activations stay in cache, while vmap's grouped convolutions do not), whereas a tiny MLP is
dominated by per-task Python and gains from vmap. So ``vectorize="auto"`` times one meta-gradient
both ways on the actual device and episode shapes and keeps the faster.

The choice is remembered per process and in ``$METABENCH_CACHE/vectorize.json``, keyed by device,
torch version, algorithm and shapes, so every later run of the same setting on the same machine takes
the same path (the two paths agree to float rounding only, and a seed must reproduce a CPU run
bit for bit). Runs record the choice; passing it explicitly (``vectorize=True/False``) reproduces it
anywhere.
"""
from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from datamodules.download import cache_root

AUTO = "auto"
CACHE_FILE = "vectorize.json"
VERSION = 3  # part of every key: bump when the loop or vmap path changes speed, to measure again
_MEMORY: dict[str, "VectorizeChoice"] = {}


@dataclass
class VectorizeChoice:
    """The resolved mode: ``vectorize`` (vmap or loop), how it was decided, and the timings if measured."""

    vectorize: bool
    source: str  # "given", "measured", "cached" or "vmap failed: <error>"
    seconds: dict[str, float] | None = None

    @property
    def mode(self) -> str:
        return "vmap" if self.vectorize else "loop"

    def to_dict(self) -> dict:
        return {"mode": self.mode, **asdict(self)}


def check_vectorize(value: bool | str) -> bool | str:
    """``True``, ``False`` or ``"auto"``; anything else is an error naming those."""
    if isinstance(value, bool) or value == AUTO:
        return value
    raise ValueError(f"vectorize must be True (vmap over tasks), False (a loop) or 'auto' (measure both); got {value!r}")


def device_description(device: torch.device) -> str:
    """What decides the speed: the GPU's name, or the CPU architecture, core count and torch threads."""
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"{device.type}:{platform.machine()}:{os.cpu_count()}cpus:threads={torch.get_num_threads()}"


def resolve(key: dict, trial: Callable[[bool], None], device: torch.device, repeats: int = 2) -> VectorizeChoice:
    """The cached choice for ``key``, or a new one from timing ``trial(False)`` against ``trial(True)``.

    ``trial(vectorize)`` must compute one full meta-gradient (forward and backward) without touching
    ``.grad``. Each mode runs once to warm up, then up to ``repeats`` times interleaved; the faster
    minimum wins. A clear verdict ends the measurement early: a 2x gap between warm-up runs that each
    took over half a second (warm-up costs cannot explain it), or a 1.3x gap between timed runs. If
    vmap fails (an operation without a batching rule), the loop is chosen and the error kept.
    """
    text = json.dumps({**key, "device": device_description(device), "torch": torch.__version__, "version": VERSION},
                      sort_keys=True)
    if text in _MEMORY:
        return _MEMORY[text]
    cached = _read_cache().get(text)
    if cached is not None:
        choice = VectorizeChoice(bool(cached["vectorize"]), "cached", cached.get("seconds"))
    else:
        choice = _measure(trial, device, repeats)
        if choice.source == "measured":
            _write_cache(text, choice)
    _MEMORY[text] = choice
    return choice


def _measure(trial: Callable[[bool], None], device: torch.device, repeats: int) -> VectorizeChoice:
    def timed(vectorize: bool) -> float:
        _synchronize(device)
        started = time.perf_counter()
        trial(vectorize)
        _synchronize(device)
        return time.perf_counter() - started

    warm = {"loop": timed(False)}
    try:
        warm["vmap"] = timed(True)
    except Exception as error:  # noqa: BLE001 -- any vmap failure means: use the loop
        return VectorizeChoice(False, f"vmap failed: {type(error).__name__}: {error}"[:300])
    if min(warm.values()) > 0.5 and max(warm.values()) > 2 * min(warm.values()):
        return VectorizeChoice(warm["vmap"] < warm["loop"], "measured", warm)
    times: dict[str, list[float]] = {"loop": [], "vmap": []}
    for _ in range(repeats):
        times["loop"].append(timed(False))
        times["vmap"].append(timed(True))
        seconds = {mode: min(values) for mode, values in times.items()}
        if max(seconds.values()) > 1.3 * min(seconds.values()):
            break
    return VectorizeChoice(seconds["vmap"] < seconds["loop"], "measured", seconds)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _read_cache() -> dict:
    try:
        return json.loads((cache_root() / CACHE_FILE).read_text())
    except (OSError, ValueError):
        return {}  # absent or unreadable: measure again


def _write_cache(text: str, choice: VectorizeChoice) -> None:
    """Add one choice to the cache file atomically (a lost concurrent update only costs a re-measurement)."""
    folder = cache_root()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        entries = {**_read_cache(), text: {"vectorize": choice.vectorize, "seconds": choice.seconds}}
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{CACHE_FILE}.")
        try:
            with os.fdopen(fd, "w") as handle:
                json.dump(entries, handle, indent=1, sort_keys=True)
            os.replace(tmp, folder / CACHE_FILE)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError:
        pass  # a read-only cache folder: the in-process memory still keeps runs consistent
