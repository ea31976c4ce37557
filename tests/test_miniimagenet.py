"""miniImageNet: decoding (jpgs in a zip or folder, learn2learn pickles), cache, episodes, device-side
normalisation/augmentation, and one clear error per bad input. Small synthetic datasets of real jpgs
written by PIL exercise the real code path; one test runs on the real data."""
from __future__ import annotations

import io
import os
import pickle
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import datamodules.miniimagenet as miniimagenet
from datamodules import DataError, MiniImageNetDataModule, datamodule_class
from datamodules.augment import random_crop_flip
from datamodules.episodes import seeded_generator

CLASSES = {"train": 3, "val": 2, "test": 2}
PER_CLASS = 6
SIZE = miniimagenet.IMAGE_SIZE


def write_dataset(root: Path, as_zip: bool = True, classes: dict[str, int] = CLASSES) -> dict[str, bytes]:
    """A miniImageNet-shaped dataset of real jpgs under ``root/miniimagenet``; returns {filename: jpg bytes}."""
    folder = root / "miniimagenet"
    images = folder / "images"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    written = {}
    for split_number, (split, count) in enumerate(classes.items()):
        lines = ["filename,label"]
        for c in range(count):
            label = f"n{split_number}{c:07d}"
            for i in range(PER_CLASS):
                name = f"{label}{i:08d}.jpg"
                base = rng.integers(0, 256, (1, 1, 3))
                pixels = np.clip(base + rng.normal(0, 40, (SIZE, SIZE, 3)), 0, 255).astype(np.uint8)
                buffer = io.BytesIO()
                Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
                written[name] = buffer.getvalue()
                (images / name).write_bytes(written[name])
                lines.append(f"{name},{label}")
        (folder / f"{split}.csv").write_text("\n".join(lines) + "\n")
    if as_zip:
        with zipfile.ZipFile(folder / "images.zip", "w", zipfile.ZIP_STORED) as archive:
            for name in sorted(written):
                archive.write(images / name, f"images/{name}")
        shutil.rmtree(images)
    return written


def pil_pixels(jpg: bytes) -> torch.Tensor:
    return torch.from_numpy(np.array(Image.open(io.BytesIO(jpg)).convert("RGB"))).permute(2, 0, 1)


@pytest.fixture
def data_env(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("METABENCH_DATA", str(tmp_path))
    monkeypatch.setenv("METABENCH_CACHE", str(tmp_path / "cache"))
    return tmp_path


def small_module(**overrides) -> MiniImageNetDataModule:
    settings = dict(ways=2, shots=1, queries=2, meta_batch=3, eval_batch=2, val_episodes=4, test_episodes=5)
    return MiniImageNetDataModule(**{**settings, **overrides})


def test_zip_is_decoded_class_major_with_the_pixels_pil_reads(data_env):
    written = write_dataset(data_env)
    datamodule = small_module()
    datamodule.setup()
    store = datamodule.store
    assert datamodule_class("miniimagenet") is MiniImageNetDataModule
    assert store.images.shape == (7, PER_CLASS, 3, SIZE, SIZE) and store.images.dtype == torch.uint8
    assert store.class_names[:4] == ["train/n00000000", "train/n00000001", "train/n00000002", "val/n10000000"]
    assert {s: datamodule.split_classes(s).tolist() for s in CLASSES} == {"train": [0, 1, 2], "val": [3, 4],
                                                                          "test": [5, 6]}
    for class_id, name in enumerate(store.class_names):
        label = name.split("/")[1]
        for i in range(PER_CLASS):
            assert torch.equal(store.images[class_id, i], pil_pixels(written[f"{label}{i:08d}.jpg"]))
    assert datamodule.task_arguments()["in_channels"] == 3 and datamodule.task_arguments()["image_size"] == SIZE


def test_folder_zip_and_learn2learn_pickles_give_the_same_store(tmp_path, monkeypatch):
    stores = {}
    for kind in ("zip", "folder", "pickles"):
        root = tmp_path / kind
        written = write_dataset(root, as_zip=kind == "zip")
        if kind == "pickles":  # learn2learn's layout: rows in any order, class_dict pointing at them
            folder = root / "miniimagenet"
            for split, filename in miniimagenet.PICKLES.items():
                labelled = miniimagenet.read_split_csv(folder / f"{split}.csv")
                files = [(label, f) for label in sorted(labelled, reverse=True) for f in labelled[label]]
                order = np.random.default_rng(1).permutation(len(files))
                image_data = np.stack([pil_pixels(written[files[i][1]]).permute(1, 2, 0).numpy() for i in order])
                class_dict: dict[str, list[int]] = {}
                for row, i in enumerate(order):
                    class_dict.setdefault(files[i][0], []).append(row)
                class_dict = {label: sorted(rows, key=lambda r: labelled[label].index(files[order[r]][1]))
                              for label, rows in class_dict.items()}
                with open(folder / filename, "wb") as handle:
                    pickle.dump({"image_data": image_data, "class_dict": class_dict}, handle)
            shutil.rmtree(folder / "images")
            for split in CLASSES:
                (folder / f"{split}.csv").unlink()
        monkeypatch.setenv("METABENCH_DATA", str(root))
        monkeypatch.setenv("METABENCH_CACHE", str(root / "cache"))
        stores[kind] = miniimagenet.build_miniimagenet_store()
    assert torch.equal(stores["zip"].images, stores["folder"].images)
    assert torch.equal(stores["zip"].images, stores["pickles"].images)
    assert stores["zip"].class_names == stores["pickles"].class_names


def test_store_is_cached_and_not_decoded_again(data_env, monkeypatch):
    write_dataset(data_env)
    first = miniimagenet.build_miniimagenet_store()
    cached = list((data_env / "cache").glob("miniimagenet84-*.pt"))
    assert len(cached) == 1 and cached[0].stat().st_size >= first.images.numel()

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded although the cache is valid")

    monkeypatch.setattr(miniimagenet, "decode_all", no_decoding)
    again = miniimagenet.build_miniimagenet_store()
    assert torch.equal(again.images, first.images) and again.class_names == first.class_names


def test_parallel_and_serial_decoding_agree(data_env, monkeypatch):
    write_dataset(data_env)
    root = data_env / "miniimagenet"
    monkeypatch.setattr(miniimagenet, "decode_processes", lambda: 2)
    parallel = miniimagenet.build_store_from_images(root)
    monkeypatch.setattr(miniimagenet, "decode_processes", lambda: 1)
    assert torch.equal(parallel.images, miniimagenet.build_store_from_images(root).images)


def test_evaluation_episodes_are_plain_training_episodes_are_cropped_and_flipped(data_env):
    write_dataset(data_env)
    datamodule = small_module(augmentation=True, crop_padding=4)
    datamodule.setup()
    flat = datamodule.store.flat()
    test_batch = next(iter(datamodule.test_dataloader()))
    episode = datamodule.on_after_batch_transfer(test_batch, 0)
    assert episode.support_x.shape == (2, 2, 3, SIZE, SIZE) and episode.query_x.shape == (2, 4, 3, SIZE, SIZE)
    assert torch.equal(episode.support_x[1, 1], flat[test_batch["indices"][1, 1, 0]].float() / 255)

    batch = next(iter(datamodule.train_dataloader()))
    augmented = datamodule.on_after_batch_transfer(batch, 0)
    originals = flat[batch["indices"]].float() / 255                       # [tasks, ways, 3, 3, H, W]
    grouped = torch.cat([augmented.support_x.unflatten(1, (2, 1)), augmented.query_x.unflatten(1, (2, 2))], 2)
    padded = torch.nn.functional.pad(originals, (4, 4, 4, 4))
    changed = 0
    for index in np.ndindex(*grouped.shape[:3]):
        candidates = [padded[index][:, y:y + SIZE, x:x + SIZE] for y in range(9) for x in range(9)]
        candidates += [c.flip(-1) for c in candidates]
        assert any(torch.equal(grouped[index], c) for c in candidates), f"image {index} is no crop/flip of its source"
        changed += not torch.equal(grouped[index], originals[index])
    assert changed > grouped.shape[:3].numel() // 2  # 161 of 162 windows differ from the identity

    same = small_module(augmentation=True, crop_padding=4)
    same.setup()
    repeat = same.on_after_batch_transfer(next(iter(same.train_dataloader())), 0)
    assert torch.equal(repeat.query_x, augmented.query_x)  # same seed, same augmentation


def test_normalization_uses_training_statistics(data_env):
    write_dataset(data_env)
    datamodule = small_module(normalization=True)
    datamodule.setup()
    train = datamodule.store.images[:3].double() / 255
    mean, std = datamodule.channel_statistics()
    expected_mean = train.mean(dim=(0, 1, 3, 4))
    expected_std = train.transpose(0, 2).reshape(3, -1).std(dim=1, unbiased=False)
    assert torch.allclose(mean.flatten().double(), expected_mean, atol=1e-6)
    assert torch.allclose(std.flatten().double(), expected_std, atol=1e-6)
    batch = next(iter(datamodule.test_dataloader()))
    episode = datamodule.on_after_batch_transfer(batch, 0)
    raw = datamodule.store.flat()[batch["indices"][0, 0, 0]].float() / 255
    assert torch.equal(episode.support_x[0, 0], (raw - mean) / std)  # in place, with the same rounding


def test_augmentation_is_batched_no_python_per_image(count_ops):
    images = {batch: torch.rand(batch, 5, 3, 3, 12, 12) for batch in (1, 64)}
    counts = [count_ops(lambda: random_crop_flip(images[batch], 2, seeded_generator(0))) for batch in (1, 64)]
    assert counts[0] == counts[1]


def test_sampling_and_gathering_a_meta_batch_costs_the_same_ops_at_any_size(data_env, count_ops):
    """Sampler, gather, augmentation and normalisation: a fixed number of tensor ops per meta-batch."""
    write_dataset(data_env)
    datamodule = small_module(augmentation=True, normalization=True)
    datamodule.setup()
    datamodule.channel_statistics()  # computed once, outside the counted steps

    def training_batch(tasks: int):
        indices = datamodule.samplers["train"].sample(tasks, seeded_generator(0))
        return datamodule.on_after_batch_transfer({"indices": indices, "ids": torch.full((tasks,), -1)}, 0)

    counts = [count_ops(lambda: training_batch(tasks)) for tasks in (4, 16, 64)]
    assert training_batch(64).query_x.shape == (64, 4, 3, SIZE, SIZE)
    # A reshape may be a view or a copy depending on the shape (one op more or less); Python per
    # task or per image would add dozens of ops from 4 to 64 tasks.
    assert max(counts) - min(counts) <= 2, counts


@pytest.mark.parametrize("breakage, fragment", [
    ("no dataset", r"miniImageNet not found in .*images.zip .*train.csv, val.csv, test.csv .*mini-imagenet-cache-train.pkl"),
    ("missing csv", r"incomplete: val.csv missing"),
    ("image absent", r"1 image\(s\) listed in the csvs are not in .*images: n1000000100000003.jpg"),
    ("wrong size", r"not readable 84x84 images: .*/images/n0000000000000002.jpg is 80x84"),
    ("pickle keys", r"mini-imagenet-cache-validation.pkl: expected learn2learn's miniImageNet cache, a dict with "
                    r"keys 'image_data' and 'class_dict', but found \['class_to_images', 'images'\]"),
])
def test_bad_data_gets_one_clear_error(data_env, breakage, fragment):
    folder = data_env / "miniimagenet"
    if breakage == "pickle keys":
        folder.mkdir()
        good = {"image_data": np.zeros((2, SIZE, SIZE, 3), np.uint8), "class_dict": {"n0": [0, 1]}}
        for split, name in miniimagenet.PICKLES.items():
            payload = good if split != "val" else {"images": good["image_data"], "class_to_images": {"n1": [0, 1]}}
            (folder / name).write_bytes(pickle.dumps(payload))
    elif breakage != "no dataset":
        write_dataset(data_env, as_zip=False)
        if breakage == "missing csv":
            (folder / "val.csv").unlink()
        elif breakage == "image absent":
            (folder / "images/n1000000100000003.jpg").unlink()
        elif breakage == "wrong size":
            Image.new("RGB", (80, 84)).save(folder / "images/n0000000000000002.jpg")
    with pytest.raises(DataError, match=fragment):
        small_module().setup()


def test_unsatisfiable_request_and_unknown_split_are_named(data_env):
    write_dataset(data_env)
    with pytest.raises(DataError, match=r"shots \+ queries = 2 \+ 5 = 7 but each class has only 6 images"):
        small_module(shots=2, queries=5).setup()
    with pytest.raises(DataError, match="unknown miniImageNet split 'vinyals': the only one is 'ravi'"):
        MiniImageNetDataModule(split="vinyals")


REAL = Path(os.environ.get("METABENCH_DATA", "data")) / "miniimagenet"


@pytest.mark.skipif(not REAL.is_dir(), reason=f"no miniImageNet under {REAL}")
def test_real_ravi_split_decodes_to_64_16_20_classes_of_600(monkeypatch):
    """The real release (first run decodes all 60,000 jpgs into the cache)."""
    datamodule = MiniImageNetDataModule(ways=5, shots=5, queries=15, meta_batch=2, eval_batch=5,
                                        val_episodes=5, test_episodes=10, normalization=True, augmentation=True)
    datamodule.setup()
    store = datamodule.store
    assert store.images.shape == (100, 600, 3, 84, 84)
    assert [datamodule.split_classes(s).numel() for s in ("train", "val", "test")] == [64, 16, 20]
    with zipfile.ZipFile(REAL / "images.zip") as archive:
        first_test_class = store.class_names[80].split("/")[1]
        files = miniimagenet.read_split_csv(REAL / "test.csv")[first_test_class]
        assert torch.equal(store.images[80, 599], pil_pixels(archive.read(f"images/{files[599]}")))
    episode = datamodule.on_after_batch_transfer(next(iter(datamodule.train_dataloader())), 0)
    assert episode.support_x.shape == (2, 25, 3, 84, 84) and torch.isfinite(episode.query_x).all()
    mean, std = datamodule.channel_statistics()
    assert 0.35 < mean.mean() < 0.55 and 0.2 < std.mean() < 0.35
    with pytest.raises(DataError, match=r"shots \+ queries = 590 \+ 15 = 605 but each class has only 600"):
        MiniImageNetDataModule(shots=590, queries=15).setup()
