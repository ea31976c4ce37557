"""Run records: one JSON file per run, written atomically; the single source of every result."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

SCHEMA = 1
REQUIRED = ("schema", "status", "key", "config")


class CorruptRecordError(ValueError):
    """A record file exists but is not a valid record (partial write, edited by hand, ...)."""


def write_record(path: Path, record: dict[str, Any]) -> Path:
    """Write ``record`` to ``path`` via a temporary file and an atomic rename.

    Readers never see a half-written file, and concurrent writers of the same path leave one
    complete record (the last rename wins).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would make records unreadable to other users
        with os.fdopen(fd, "w") as handle:
            json.dump(record, handle, indent=1, sort_keys=True, allow_nan=True)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def read_record(path: Path) -> dict[str, Any]:
    """Load and validate one record; raise :class:`CorruptRecordError` naming the file if invalid."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise CorruptRecordError(f"{path}: unreadable record ({error}); delete it to rerun that run") from error
    missing = [field for field in REQUIRED if field not in record] if isinstance(record, dict) else list(REQUIRED)
    if missing:
        raise CorruptRecordError(f"{path}: record lacks {missing}; delete it to rerun that run")
    return record


def git_state() -> dict[str, Any]:
    """Commit and dirtiness of the checkout the code runs from (None outside git)."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                    capture_output=True, text=True, check=True).stdout.strip())
        return {"commit": commit, "dirty": dirty}
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": platform.python_version()}
    for name in ("torch", "pytorch-lightning", "torchmetrics", "learn2learn", "wandb"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    return versions


def cpuinfo_field(name: str) -> str | None:
    """The first ``name : value`` of /proc/cpuinfo (Linux), else None."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(name):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_model() -> str | None:
    """The CPU's marketing name, else None."""
    return cpuinfo_field("model name")


def cpu_vendor() -> str:
    """The CPU vendor id (``GenuineIntel``, ``AuthenticAMD``), else the machine type."""
    return cpuinfo_field("vendor_id") or platform.machine() or "cpu"


def kernel_family(device: torch.device) -> str:
    """Which kernels computed a run: the GPU's name, or the CPU vendor and the instruction set torch dispatches
    to (e.g. ``genuineintel-avx512``). Float results are bit-identical within a family on CPU and differ by
    rounding across families, which training amplifies (see :mod:`bench.regress`)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{cpu_vendor()}-{torch.backends.cpu.get_cpu_capability()}"
    return "-".join("".join(c if c.isalnum() else " " for c in name.lower()).split())


def hardware(device: torch.device) -> dict[str, Any]:
    info = {"cpu": platform.processor() or platform.machine(), "cpu_model": cpu_model(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "device": str(device), "kernel_family": kernel_family(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def record_key_from_filename(path: Path) -> str | None:
    """The run key a record file is named by (``<name>-<key>.json``), or None for foreign names."""
    stem = Path(path).stem
    key = stem.rsplit("-", 1)[-1]
    return key if len(key) == 12 and all(c in "0123456789abcdef" for c in key) else None


def scan_records(directory: Path) -> tuple[dict[str, tuple[Path, dict[str, Any]]], list[str]]:
    """Every valid record in ``directory`` by run key, and a list of problems (never silently dropped).

    Problems are corrupt or partial files, records whose file name and key disagree, and two files
    holding the same key. Temporary files of writes in progress (``.name.json.XXXX.tmp``) are ignored.
    """
    found: dict[str, tuple[Path, dict[str, Any]]] = {}
    problems: list[str] = []
    directory = Path(directory)
    if not directory.is_dir():
        return found, problems
    for path in sorted(directory.glob("*.json")):
        try:
            record = read_record(path)
        except CorruptRecordError as error:
            problems.append(str(error))
            continue
        named = record_key_from_filename(path)
        if named is not None and named != record["key"]:
            problems.append(f"{path}: file name says key {named} but the record has key {record['key']}; "
                            "rename or delete it")
            continue
        if record["key"] in found:
            problems.append(f"{path}: duplicate of {found[record['key']][0]} (same run key {record['key']}); "
                            "delete one of them")
            continue
        found[record["key"]] = (path, record)
    return found, problems
