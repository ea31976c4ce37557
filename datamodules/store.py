"""The uint8 image store: every image of a dataset decoded once, class-major, cached on disk.

Layout: ``images[class, example, channel, height, width]`` (uint8). Every class has the same number
of examples, so an image's flat index is ``class * per_class + example`` and an episode is nothing
but an integer tensor. The store is moved to the training device once; episodes gather from it there.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from datamodules.download import DataError

CACHE_FORMAT = 1


@dataclass
class ImageStore:
    """Decoded images of one dataset, ``[classes, per_class, C, H, W]`` uint8, with class names."""

    images: torch.Tensor
    class_names: list[str]
    _on_device: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 5:
            raise ValueError("ImageStore wants a uint8 tensor [classes, per_class, C, H, W]")
        if len(self.class_names) != self.images.shape[0]:
            raise ValueError("one class name per class is required")

    @property
    def num_classes(self) -> int:
        return self.images.shape[0]

    @property
    def per_class(self) -> int:
        return self.images.shape[1]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[2:])  # type: ignore[return-value]

    def flat(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """All images as ``[classes * per_class, C, H, W]`` on ``device`` (copied there once)."""
        key = str(torch.device(device))
        if key not in self._on_device:
            self._on_device[key] = self.images.reshape(-1, *self.image_shape).to(device).contiguous()
        return self._on_device[key]

    def gather(self, indices: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Images at flat ``indices`` (any shape), on the indices' device, scaled to [0, 1]."""
        flat = self.flat(indices.device)
        picked = flat.index_select(0, indices.reshape(-1))
        return picked.reshape(*indices.shape, *self.image_shape).to(dtype).div_(255.0)


def _cache_file(name: str, key: dict) -> str:
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return f"{name}-{digest}.pt"


def cached_store(name: str, key: dict, build: Callable[[], ImageStore], cache_dir: Path) -> ImageStore:
    """Load the store for ``key`` from ``cache_dir``, or ``build`` it and cache it atomically.

    ``key`` must describe everything the decoded pixels depend on (source files, image size, ...).
    A cache file that cannot be read is rebuilt rather than trusted.
    """
    key = {**key, "format": CACHE_FORMAT}
    path = cache_dir / _cache_file(name, key)
    if path.exists():
        try:
            payload = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            if payload["key"] == json.dumps(key, sort_keys=True):
                return ImageStore(payload["images"], list(payload["class_names"]))
        except (OSError, RuntimeError, KeyError, ValueError):
            pass  # corrupt or foreign cache: rebuild below
    started = time.perf_counter()
    store = build()
    cache_dir.mkdir(parents=True, exist_ok=True)
    payload = {"key": json.dumps(key, sort_keys=True), "images": store.images, "class_names": store.class_names}
    fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=f".{path.name}.")
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    print(f"[metabench] decoded {name}: {store.images.shape[0]} classes x {store.per_class} images "
          f"in {time.perf_counter() - started:.1f}s, cached at {path}")
    return store


def file_fingerprint(path: Path) -> list:
    """``[path, size, mtime_ns]`` of a source file or folder (``None`` for an absent one), for cache keys."""
    if not path.exists():
        return [str(path), None, None]
    status = path.stat()
    return [str(path), status.st_size, status.st_mtime_ns]


def require(condition: bool, message: str) -> None:
    """Raise a :class:`DataError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise DataError(message)
