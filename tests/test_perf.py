"""The ``make perf`` machinery: fair inputs for learn2learn, interleaved timing, memory, and a tiny end-to-end run.

These check that the benchmark measures what it says (learn2learn gets exactly our images; rounds
interleave; ratios are of medians; peak memory sees an allocation) -- never how fast anything is.
"""
from __future__ import annotations

import json

import pytest
import torch

from bench import perf, perf_allocator
from bench.perf_sampling import StoreImages, l2l_stock_omniglot_taskset, l2l_taskset, split_l2l_task
from bench.perf_timing import Workload, interleaved, peak_memory, ratio, summary
from bench.perf_training import l2l_maml


def test_learn2learn_tasks_are_made_of_our_images(omniglot_vinyals):
    store = omniglot_vinyals.store
    classes = omniglot_vinyals.split_classes("train")
    dataset = StoreImages(store, classes)
    taskset = l2l_taskset(dataset, dataset.labels_to_indices(), ways=5, samples=4)
    data, labels = taskset.sample()
    blocks = labels.view(5, 4)  # each class's examples consecutive, labels 0..4 in some order
    assert data.shape == (20, 1, 28, 28) and (blocks == blocks[:, :1]).all() and sorted(blocks[:, 0].tolist()) == [0, 1, 2, 3, 4]
    # Identify every image by an integer hash of its pixels: each class block is 4 images of one training class.
    weights = torch.randint(0, 2 ** 20, (28 * 28,), generator=torch.Generator().manual_seed(0))
    train_images = store.images[classes].flatten(2).long()               # [classes, 20, 784]
    owner = {int(key): c for c, row in enumerate(train_images @ weights) for key in row}
    keys = (data * 255).round().long().flatten(1) @ weights
    owners = torch.tensor([owner.get(int(key), -1) for key in keys]).view(5, 4)
    assert (owners >= 0).all() and (owners == owners[:, :1]).all() and owners[:, 0].unique().numel() == 5
    support_x, support_y, query_x, query_y = split_l2l_task(data, labels, shots=1, device=torch.device("cpu"))
    assert support_y.tolist() == blocks[:, 0].tolist() and query_y.tolist() == blocks[:, 1:].flatten().tolist()
    assert torch.equal(support_x[2], data[8]) and torch.equal(query_x[3], data[5]) and query_x.shape == (15, 1, 28, 28)


def test_learn2learn_stock_pipeline_feeds_its_maml_step(omniglot_vinyals):
    """learn2learn's own Omniglot pipeline (PNG files, resize, rotation) yields 5-way tasks of 28x28 ink-on-black
    images, and its MAML meta-iteration runs end to end on it (the 'stock pipeline' rows of perf.md)."""
    taskset = l2l_stock_omniglot_taskset(ways=5, samples=16)
    assert taskset is not None, "the Omniglot zips are in METABENCH_DATA, so the stock pipeline must build"
    data, labels = taskset.sample()
    blocks = labels.view(5, 16)
    assert data.shape == (80, 1, 28, 28) and (blocks == blocks[:, :1]).all()
    assert sorted(blocks[:, 0].tolist()) == [0, 1, 2, 3, 4]
    assert 0.0 <= float(data.min()) and float(data.max()) <= 1.0 and float(data.mean()) < 0.5  # inverted: dark background
    network, step = l2l_maml(omniglot_vinyals, tasks=2, hidden=4, first_order=False, device=torch.device("cpu"),
                             taskset=taskset)
    before = [p.detach().clone() for p in network.parameters()]
    step()
    assert any(not torch.equal(a, b) for a, b in zip(before, network.parameters()))


def test_rounds_interleave_in_rotating_order_and_exclude_warmup():
    calls: list[str] = []
    workloads = [Workload(name, lambda name=name: calls.append(name)) for name in "abc"]
    seconds = interleaved(workloads, rounds=3, warmup=1, device=torch.device("cpu"), progress=lambda _: None)
    assert calls == list("abc" "bca" "cab" "abc")
    assert all(len(values) == 3 and min(values) >= 0 for values in seconds.values())


def test_ratio_of_medians_and_paired_spread():
    value = ratio([4.0, 6.0, 100.0], [1.0, 2.0, 2.0])
    assert value["ratio"] == pytest.approx(6.0 / 2.0)
    assert (value["paired_min"], value["paired_median"], value["paired_max"]) == pytest.approx((3.0, 4.0, 50.0))
    stats = summary([3.0, 1.0, 2.0, 4.0])
    assert stats["median"] == 2.5 and stats["min"] == 1.0 and stats["max"] == 4.0 and stats["n"] == 4


def test_peak_memory_sees_what_a_step_allocates():
    def allocate() -> None:
        block = torch.ones(64 * 2 ** 20 // 4)  # 64 MiB, written
        block.add_(1)

    grown = peak_memory(allocate, torch.device("cpu"))["bytes"]
    assert 48 * 2 ** 20 < grown < 256 * 2 ** 20
    assert peak_memory(lambda: None, torch.device("cpu"))["bytes"] < 16 * 2 ** 20


def test_tiny_benchmark_writes_json_and_markdown(tmp_path, omniglot_vinyals):
    code = perf.main(["--datasets", "omniglot", "--no-stock", "--no-ablations", "--no-compile", "--threads", "1",
                      "--rounds", "2", "--warmup", "0", "--meta-batch", "2", "--hidden", "4",
                      "--sampler-seconds", "0.01", "--out", str(tmp_path), "--quiet"])
    assert code == 0
    result = json.loads((tmp_path / "perf.json").read_text())
    sampling = result["sampling"]["datasets"]["omniglot"]
    assert set(sampling["ratios"]) == {"omniglot 5w1s15q ours: indices / omniglot 5w1s15q learn2learn: same images",
                                       "omniglot 5w1s15q ours: episodes / omniglot 5w1s15q learn2learn: same images"}
    training = result["training"]
    assert {"ours MAML", "learn2learn MAML", "ours FOMAML", "learn2learn FOMAML", "ours ProtoNet",
            "learn2learn ProtoNet", "proxy: one supervised batch", "proxy: supervised, per task",
            "ours MAML, bf16-mixed", "ours FOMAML, bf16-mixed", "ours ProtoNet, bf16-mixed"} <= set(training["workloads"])
    assert all(len(entry["seconds"]) == 2 and "bytes" in entry["peak_memory"] for entry in training["workloads"].values())
    assert training["vectorize"]["maml"]["mode"] in ("loop", "vmap")
    differences = training["max_meta_gradient_difference"]
    assert differences["maml float64"]["relative"] < 1e-9 and differences["fomaml float64"]["relative"] < 1e-9
    assert differences["maml float32"]["relative"] < 0.5  # rounding of other kernels only (float64 is exact)
    text = (tmp_path / "perf.md").read_text()
    assert "| MAML 2nd order: learn2learn (same images in memory) / ours |" in text and "episodes/s" in text


def test_allocator_benchmark_times_both_settings_in_separate_processes(tmp_path, omniglot_vinyals):
    code = perf_allocator.main(["--rounds", "1", "--steps", "1", "--threads", "1", "--out", str(tmp_path)])
    assert code == 0
    result = json.loads((tmp_path / "perf-allocator.json").read_text())
    for setting in ("default", "retain"):
        assert len(result["rounds"][setting]) == 1
        assert set(result["median_seconds"][setting]) == set(perf_allocator.WORKLOADS)
        assert all(seconds > 0 for seconds in result["median_seconds"][setting].values())
    assert all(speedup > 0 for speedup in result["speedup"].values())
    assert "| ours ProtoNet 20w5s15q |" in (tmp_path / "perf-allocator.md").read_text()
