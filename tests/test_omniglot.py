"""Omniglot store, splits, cache and the clear errors for bad data or requests (real data)."""
from __future__ import annotations

import time
import zipfile
from pathlib import Path

import pytest
import torch

from datamodules import DataError, OmniglotDataModule
from datamodules.download import RemoteFile, fetch, md5sum


def test_vinyals_split_sizes_and_rotations(omniglot_vinyals):
    sizes = {split: omniglot_vinyals.split_classes(split).numel() for split in ("train", "val", "test")}
    assert sizes == {"train": 4112, "val": 688, "test": 1692}
    store = omniglot_vinyals.store
    assert store.images.shape == (1623 * 4, 20, 1, 28, 28) and store.images.dtype == torch.uint8
    # Class 4c+k is character c turned by k quarter turns.
    base, turned = store.images[8], store.images[9]
    assert torch.equal(torch.rot90(base, 1, dims=(-2, -1)), turned)
    assert store.class_names[9].endswith("/rot090")
    # Splits are disjoint and their characters never overlap (rotations stay within one split).
    characters = {s: set((omniglot_vinyals.split_classes(s) // 4).tolist()) for s in ("train", "val", "test")}
    assert not characters["train"] & characters["test"] and not characters["val"] & characters["test"]


def test_images_are_strokes_on_dark_background(omniglot_vinyals):
    images = omniglot_vinyals.store.images[:50].float() / 255
    assert 0.05 < images.mean() < 0.35  # strokes are a minority of the pixels, and bright
    assert images.amax() == 1.0


def test_lake_split_uses_background_for_training_and_evaluation_for_testing():
    datamodule = OmniglotDataModule(split="lake", test_episodes=10, val_episodes=10)
    datamodule.setup()
    train, test = datamodule.split_classes("train"), datamodule.split_classes("test")
    assert train.numel() == 964 and test.numel() == 659
    assert all(datamodule.store.class_names[c].endswith("rot000") for c in torch.cat([train, test]).tolist())
    background = {datamodule.store.class_names[c].split("/")[0] for c in train.tolist()}
    evaluation = {datamodule.store.class_names[c].split("/")[0] for c in test.tolist()}
    assert len(background) == 30 and len(evaluation) == 20 and not background & evaluation


def test_lake_training_rotations_add_rotated_background_classes_and_keep_the_test_episodes():
    plain = OmniglotDataModule(split="lake", test_episodes=10, val_episodes=10)
    rotated = OmniglotDataModule(split="lake", train_rotations=True, test_episodes=10, val_episodes=10)
    plain.setup()
    rotated.setup()
    train = rotated.split_classes("train")
    assert train.numel() == 4 * 964
    names = [rotated.store.class_names[c] for c in train.tolist()]
    assert {name.split("/")[-1] for name in names} == {"rot000", "rot090", "rot180", "rot270"}
    assert {name.rsplit("/", 1)[0] for name in names} == \
        {plain.store.class_names[c].rsplit("/", 1)[0] for c in plain.split_classes("train").tolist()}
    assert torch.equal(rotated.episodes["test"], plain.episodes["test"])


def test_second_start_reads_the_cache_quickly(omniglot_vinyals):
    started = time.perf_counter()
    again = OmniglotDataModule(split="vinyals")
    again.setup()
    assert torch.equal(again.store.images, omniglot_vinyals.store.images)
    assert time.perf_counter() - started < 30  # generous: decoding from the zips takes longer


@pytest.mark.parametrize("request_args, fragment", [
    ({"shots": 10, "queries": 15}, r"shots \+ queries = 10 \+ 15 = 25 but each class has only 20"),
    ({"ways": 700}, "ways <= 688"),
    ({"ways": 0}, "at least 1"),
])
def test_unsatisfiable_requests_fail_at_setup(request_args, fragment):
    datamodule = OmniglotDataModule(split="vinyals", **request_args)
    with pytest.raises(DataError, match=fragment):
        datamodule.setup()


def test_unknown_split_is_named():
    with pytest.raises(DataError, match="unknown Omniglot split 'ravi'"):
        OmniglotDataModule(split="ravi")


def _copy_zip(source: Path, destination: Path, keep) -> None:
    with zipfile.ZipFile(source) as original, zipfile.ZipFile(destination, "w") as copy:
        for name in original.namelist():
            if keep(name):
                copy.writestr(name, original.read(name))


def test_archive_with_missing_alphabet_or_images_names_the_problem(tmp_path, monkeypatch):
    real = Path(__import__("os").environ["METABENCH_DATA"]) / "omniglot"
    (tmp_path / "omniglot").mkdir()
    _copy_zip(real / "images_background.zip", tmp_path / "omniglot/images_background.zip",
              lambda name: "/Latin/" not in name)
    _copy_zip(real / "images_evaluation.zip", tmp_path / "omniglot/images_evaluation.zip",
              lambda name: not name.endswith("_20.png") or "/Angelic/character01/" not in name)
    monkeypatch.setenv("METABENCH_DATA", str(tmp_path))
    monkeypatch.setenv("METABENCH_CACHE", str(tmp_path / "cache"))
    with pytest.raises(DataError, match=r"found 29 alphabets, expected 30.*Expected under"):
        OmniglotDataModule(split="lake", download=False).setup()
    _copy_zip(real / "images_background.zip", tmp_path / "omniglot/images_background.zip", lambda name: True)
    with pytest.raises(DataError, match=r"without exactly 20 drawings: Angelic/character01"):
        OmniglotDataModule(split="lake", download=False).setup()


def test_missing_data_without_download_says_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.setenv("METABENCH_DATA", str(tmp_path))
    monkeypatch.setenv("METABENCH_CACHE", str(tmp_path / "cache"))
    with pytest.raises(DataError, match=r"images_background.zip not found.*METABENCH_DATA"):
        OmniglotDataModule(split="lake", download=False).setup()


def test_fetch_verifies_the_checksum_and_leaves_nothing_on_mismatch(tmp_path):
    source = tmp_path / "payload.bin"
    source.write_bytes(b"omniglot")
    good = RemoteFile(source.as_uri(), md5sum(source))
    assert fetch(good, tmp_path / "out/payload.bin").read_bytes() == b"omniglot"
    bad = RemoteFile(source.as_uri(), "0" * 32)
    with pytest.raises(DataError, match="checksum mismatch"):
        fetch(bad, tmp_path / "out2/payload.bin")
    assert not (tmp_path / "out2/payload.bin").exists()
    assert [p.name for p in (tmp_path / "out2").iterdir()] == []
