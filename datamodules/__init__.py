"""Episode data modules: every dataset yields N-way K-shot episodes as index tensors."""
from __future__ import annotations

from datamodules.base import EpisodicDataModule
from datamodules.download import DataError
from datamodules.miniimagenet import MiniImageNetDataModule
from datamodules.omniglot import OmniglotDataModule
from datamodules.sinusoid import LinearRegressionDataModule, SinusoidDataModule

DATASETS: dict[str, type[EpisodicDataModule]] = {
    "omniglot": OmniglotDataModule,
    "sinusoid": SinusoidDataModule,
    "linear": LinearRegressionDataModule,
    "miniimagenet": MiniImageNetDataModule,
}


def datamodule_class(name: str) -> type[EpisodicDataModule]:
    """The data module registered as ``name``; an unknown name lists the known ones."""
    try:
        return DATASETS[name.lower()]
    except KeyError:
        raise DataError(f"unknown dataset {name!r}: choose one of {', '.join(sorted(DATASETS))}") from None
