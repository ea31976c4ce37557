"""Task vectorisation and the speed-ups of ``make perf`` change nothing that is computed.

* vmap over tasks and the Python loop give the same meta-gradients (1e-10, float64) for MAML second
  order, FOMAML, Meta-SGD and ANIL on a Conv-4 with batch-statistics BatchNorm -- the case where
  vmap through PyTorch's fused BatchNorm gets second-order gradients wrong;
* ``vectorize="auto"`` measures once, remembers its choice (in memory and on disk) and records it;
* channels-last Conv-4 computes the same function as the default layout; the support pass that is
  differentiated twice keeps the default layout, where float32 second-order MAML stays accurate; pooling
  before the ReLU is exactly the conventional block, and the loop's task-by-task meta-gradient equals one
  backward through all tasks;
* the sampler's sparse and dense draws are valid, and the one-pass gather equals the old
  gather-then-split.
"""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from datamodules.episodes import Episode, EpisodeSampler, distinct_draws, seeded_generator, support_then_query
from tasks import vectorize as vectorize_module
from tasks.anil import ANIL
from tasks.backbones import BatchNorm2d, Conv4, under_task_vmap
from tasks.fomaml import FOMAML
from tasks.maml import MAML
from tasks.metasgd import MetaSGD

TINY = dict(ways=3, image_size=16, hidden=4, inner_lr=0.3)


def float64_episode(tasks: int = 2, ways: int = 3, shots: int = 1, queries: int = 2) -> Episode:
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(tasks, ways, shots + queries, 1, 16, 16, generator=generator, dtype=torch.float64)
    return Episode.from_grouped(images, shots, torch.arange(tasks))


def meta_gradients(task: MAML, episode: Episode, vectorize: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    task.vectorize = vectorize
    task.zero_grad()
    loss, _ = task.training_loss(episode)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in task.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("cls, options", [(MAML, {}), (FOMAML, {}), (MetaSGD, {}), (ANIL, {}),
                                          (MAML, {"inner_steps": 2}), (ANIL, {"first_order": True})])
def test_vmap_and_loop_give_identical_meta_gradients(cls, options):
    torch.manual_seed(0)
    task = cls(**TINY, **options).double()
    episode = float64_episode()
    loop_loss, loop = meta_gradients(task, episode, vectorize=False)
    vmap_loss, vmapped = meta_gradients(task, episode, vectorize=True)
    torch.testing.assert_close(vmap_loss, loop_loss, rtol=0, atol=1e-10)
    assert loop.keys() == vmapped.keys()
    for name in ("network.backbone.blocks.0.0.weight", "network.head.weight"):  # not vacuous
        assert loop[name].abs().max() > 1e-6, name
    for name in loop:
        torch.testing.assert_close(vmapped[name], loop[name], rtol=0, atol=1e-10, msg=name)


def test_batch_norm_under_task_vmap_is_the_fused_batch_norm():
    norm = BatchNorm2d(4, track_running_stats=False).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    inputs = torch.randn(6, 4, 5, 5, dtype=torch.float64)
    with under_task_vmap():
        primitive = norm(inputs)
    torch.testing.assert_close(primitive, norm(inputs), rtol=0, atol=1e-12)
    tracking = BatchNorm2d(4).train()
    with under_task_vmap(), pytest.raises(RuntimeError, match="track_running_stats=False"):
        tracking(inputs.float())


@pytest.mark.parametrize("channels", [1, 3])
def test_channels_last_conv4_computes_the_same_function(channels):
    torch.manual_seed(0)
    default = Conv4(channels, 4, 16, channels_last=False).double()
    nhwc = Conv4(channels, 4, 16, channels_last=True).double()
    nhwc.load_state_dict(default.state_dict())
    images = torch.rand(5, channels, 16, 16, dtype=torch.float64)
    torch.testing.assert_close(nhwc(images), default(images), rtol=0, atol=1e-12)
    default(images).square().sum().backward()
    nhwc(images).square().sum().backward()
    for (name, a), b in zip(default.named_parameters(), nhwc.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=0, atol=1e-10, msg=name)


@pytest.mark.parametrize("precision", ["float32", "bf16-mixed"])
def test_second_order_support_pass_keeps_the_default_layout(precision):
    """The support pass that is differentiated twice runs in the default layout on CPU (channels-last
    BatchNorm is slower and less accurate there); the query pass stays channels-last, in either precision."""
    torch.manual_seed(0)
    task = MAML(vectorize=False, **TINY)
    first_norm = task.network.backbone.blocks[0][1]
    layouts: list[str] = []
    first_norm.register_forward_pre_hook(lambda module, inputs: layouts.append(
        "channels-last" if inputs[0].is_contiguous(memory_format=torch.channels_last) else "default"))
    images = torch.rand(1, 3, 2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    episode = Episode.from_grouped(images, 1, torch.arange(1))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
        loss, _ = task.training_loss(episode)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in task.parameters())
    support, query = layouts
    assert (support, query) == ("default", "channels-last")


def test_float32_second_order_meta_gradient_matches_float64_at_20_ways_5_shots():
    """At 20-way 5-shot the float32 meta-gradient of second-order MAML stays within 1e-4 of the float64 one
    (it was 11% off while the support pass ran channels-last, whose BatchNorm gradients carry a rounding
    error growing with the batch, which the second-order terms amplify)."""
    torch.manual_seed(0)
    ways, shots = 20, 5
    float32 = MAML(ways=ways, inner_lr=0.1, inner_steps=1, vectorize=False)
    float64 = MAML(ways=ways, inner_lr=0.1, inner_steps=1, vectorize=False).double()
    float64.load_state_dict(float32.state_dict())
    generator = torch.Generator().manual_seed(1)
    support, query = torch.rand(1, ways * shots, 1, 28, 28, generator=generator), torch.rand(1, ways, 1, 28, 28,
                                                                                             generator=generator)
    support_y, query_y = torch.arange(ways).repeat_interleave(shots)[None], torch.arange(ways)[None]

    def meta_gradient(task: MAML, dtype: torch.dtype) -> torch.Tensor:
        episode = Episode(support.to(dtype), support_y, query.to(dtype), query_y, torch.full((1,), -1), ways)
        loss, _ = task.meta_loss(episode, vectorize=False)
        return torch.cat([g.flatten().double() for g in torch.autograd.grad(loss, list(task.parameters()))])

    exact = meta_gradient(float64, torch.float64)
    assert ((meta_gradient(float32, torch.float32) - exact).norm() / exact.norm()).item() < 1e-4


def test_pooling_before_relu_is_the_conventional_block_exactly():
    torch.manual_seed(0)
    ours = Conv4(1, 8, 16, track_running_stats=False, channels_last=False)
    conventional = torch.nn.Sequential(*[torch.nn.Sequential(block[0], block[1], block[3], block[2])
                                         for block in ours.blocks])  # conv, BatchNorm, ReLU, pool
    assert isinstance(ours.blocks[0][2], torch.nn.MaxPool2d) and isinstance(ours.blocks[0][3], torch.nn.ReLU)
    images = torch.randn(6, 1, 16, 16)
    ours_out, conventional_out = ours(images), conventional(images).flatten(1)
    assert torch.equal(ours_out, conventional_out)
    first = torch.autograd.grad(ours_out.square().sum(), list(ours.parameters()))
    second = torch.autograd.grad(conventional_out.square().sum(), list(ours.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("first_order", [False, True])
def test_task_by_task_meta_gradient_equals_one_backward_through_all_tasks(first_order):
    torch.manual_seed(0)
    task = MAML(first_order=first_order, vectorize=False, **TINY).double()
    episode = float64_episode(tasks=3)
    loss, outputs = task.training_loss(episode)  # per task: meta-gradient taken, graph freed
    ours = torch.autograd.grad(loss, list(task.parameters()))
    stacked = task.adapted_query_outputs(episode, task.inner_steps, first_order)
    reference_loss = task.loss_fn(stacked.flatten(0, 1), episode.query_y.flatten(0, 1))
    reference = torch.autograd.grad(reference_loss, list(task.parameters()))
    torch.testing.assert_close(loss, reference_loss, rtol=0, atol=1e-12)
    torch.testing.assert_close(outputs, stacked.detach(), rtol=0, atol=1e-12)
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("first_order", [False, True])
def test_bf16_autocast_meta_gradient_is_the_float32_one_up_to_rounding(first_order, omniglot_vinyals):
    """``precision: bf16-mixed`` (make perf's mixed-precision rows) runs MAML's second-order meta-gradient
    through autocast: on real episodes it must stay the float32 meta-gradient up to bfloat16 rounding (which
    BatchNorm over 5 support images amplifies in the second-order terms), in float32 tensors."""
    torch.manual_seed(0)
    task = MAML(first_order=first_order, vectorize=False, ways=5, hidden=32)
    episode = omniglot_vinyals.on_after_batch_transfer(next(iter(omniglot_vinyals.train_dataloader())), 0)
    exact = torch.autograd.grad(task.training_loss(episode)[0], list(task.parameters()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = task.training_loss(episode)
    mixed = torch.autograd.grad(loss, list(task.parameters()))
    assert all(g.dtype == torch.float32 for g in mixed)
    flat_exact, flat_mixed = torch.cat([g.flatten() for g in exact]), torch.cat([g.flatten() for g in mixed])
    assert float(F.cosine_similarity(flat_exact, flat_mixed, dim=0)) > 0.98
    assert not torch.equal(flat_exact, flat_mixed)  # autocast did run in bfloat16


@pytest.fixture
def fresh_choices(tmp_path, monkeypatch):
    """An empty choice cache: nothing remembered in memory, a new cache folder."""
    monkeypatch.setenv("METABENCH_CACHE", str(tmp_path))
    monkeypatch.setattr(vectorize_module, "_MEMORY", {})
    return tmp_path


def test_auto_measures_once_records_the_choice_and_computes_what_the_choice_computes(fresh_choices):
    torch.manual_seed(0)
    task = MAML(**TINY)
    assert task.vectorize == "auto" and task.execution == {}
    episode = float64_episode()
    episode = Episode(episode.support_x.float(), episode.support_y, episode.query_x.float(), episode.query_y,
                      episode.ids, episode.ways)
    loss, _ = task.training_loss(episode)
    choice = task.execution["vectorize"]
    assert choice["source"] == "measured" and choice["mode"] in ("loop", "vmap")
    assert set(choice["seconds"]) == {"loop", "vmap"} and min(choice["seconds"].values()) > 0
    task.vectorize = choice["vectorize"]
    explicit, _ = task.training_loss(episode)
    assert torch.equal(loss, explicit)
    # Another instance in this process reuses the choice; a new process reads it from the cache file.
    again = MAML(**TINY)
    again.training_loss(episode)
    assert again.execution["vectorize"] == choice
    vectorize_module._MEMORY.clear()
    assert (fresh_choices / vectorize_module.CACHE_FILE).exists()
    third = MAML(**TINY)
    third.training_loss(episode)
    assert third.execution["vectorize"]["source"] == "cached"
    assert third.execution["vectorize"]["vectorize"] == choice["vectorize"]


def test_runs_record_the_choice_and_a_seed_reproduces_the_run(fresh_choices, tmp_path):
    from bench.config import RunConfig
    from bench.runner import run

    config = RunConfig(algorithm="maml", dataset="omniglot", ways=3, shots=1, queries=2, meta_batch=2, eval_batch=5,
                       steps=2, val_every=2, val_episodes=5, test_episodes=10, seed=1, threads=1,
                       hparams={"hidden": 4, "test_inner_steps": 1})
    first = run(config, tmp_path / "a", progress=False)
    again = run(config, tmp_path / "b", progress=False)
    choice = first["execution"]["vectorize"]
    assert choice["mode"] in ("loop", "vmap") and choice["source"] == "measured"
    assert again["execution"]["vectorize"]["vectorize"] == choice["vectorize"]
    assert again["test"]["episode_scores"] == first["test"]["episode_scores"]


def test_given_modes_are_recorded_and_bad_modes_are_refused():
    assert MAML(vectorize=True, **TINY).execution["vectorize"] == {
        "mode": "vmap", "vectorize": True, "source": "given", "seconds": None}
    assert MAML(vectorize=False, **TINY).execution["vectorize"]["mode"] == "loop"
    with pytest.raises(ValueError, match="True .* False .* 'auto'"):
        MAML(vectorize="yes", **TINY)


def test_a_failing_vmap_falls_back_to_the_loop(fresh_choices):
    def trial(vectorize: bool) -> None:
        if vectorize:
            raise RuntimeError("no batching rule")

    choice = vectorize_module.resolve({"case": "failing"}, trial, torch.device("cpu"))
    assert choice.vectorize is False and choice.source.startswith("vmap failed: RuntimeError")


class FakeClock:
    """Stands in for ``time`` in :mod:`tasks.vectorize`: trials advance it by their nominal cost."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


@pytest.mark.parametrize("loop_s, vmap_s, calls, vectorize", [
    (0.6, 1.5, 2, False),      # a 2.5x gap between long warm-up runs decides at once
    (0.1, 0.05, 4, True),      # short runs: one timed pair, 2x apart, decides
    (0.1, 0.11, 6, False),     # close: all repeats run, the faster minimum wins
])
def test_auto_measurement_stops_once_the_verdict_is_clear(fresh_choices, monkeypatch, loop_s, vmap_s, calls,
                                                           vectorize):
    clock, modes = FakeClock(), []
    monkeypatch.setattr(vectorize_module, "time", clock)

    def trial(use_vmap: bool) -> None:
        modes.append(use_vmap)
        clock.now += vmap_s if use_vmap else loop_s

    choice = vectorize_module.resolve({"case": (loop_s, vmap_s)}, trial, torch.device("cpu"), repeats=2)
    assert len(modes) == calls and choice.vectorize is vectorize and choice.source == "measured"


@pytest.mark.parametrize("population, count", [(4112, 5), (20, 16), (600, 20), (7, 7)])
def test_distinct_draws_are_distinct_in_range_and_seeded(population, count):
    draws = distinct_draws((64, 3), population, count, seeded_generator(1))
    assert draws.shape == (64, 3, count) and draws.dtype == torch.long
    assert draws.min() >= 0 and draws.max() < population
    assert all(len(set(row.tolist())) == count for row in draws.reshape(-1, count))
    assert torch.equal(draws, distinct_draws((64, 3), population, count, seeded_generator(1)))
    with pytest.raises(ValueError, match="distinct"):
        distinct_draws((1,), population, population + 1, seeded_generator(1))


def test_sparse_class_draws_cover_the_classes_uniformly():
    classes = distinct_draws((20000,), 50, 5, seeded_generator(2)).flatten()
    counts = torch.bincount(classes, minlength=50).double()
    expected = 20000 * 5 / 50
    assert (counts - expected).abs().max() < 5 * expected ** 0.5  # ~5 sigma


def test_one_pass_gather_equals_gather_then_split():
    pixels = torch.randint(0, 256, (40 * 6, 1, 4, 4), dtype=torch.uint8)
    sampler = EpisodeSampler(torch.arange(40), per_class=6, ways=4, shots=2, queries=3)
    indices = sampler.sample(5, seeded_generator(0))
    ids = torch.arange(5)
    old = Episode.from_grouped(pixels[indices].float() / 255, 2, ids)
    new = Episode.from_support_then_query(pixels[support_then_query(indices, 2)].float() / 255, 5, 4, 2, ids)
    for field in ("support_x", "support_y", "query_x", "query_y"):
        assert torch.equal(getattr(new, field), getattr(old, field)), field


def test_evaluation_measures_its_own_choice_and_given_modes_apply_to_both(fresh_choices):
    torch.manual_seed(0)
    task = MAML(**TINY)
    episode = float64_episode()
    episode = Episode(episode.support_x.float(), episode.support_y, episode.query_x.float(), episode.query_y,
                      episode.ids, episode.ways)
    task.training_loss(episode)
    with torch.no_grad():  # as Lightning evaluates
        outputs = task.predict(episode)
    training, evaluation = task.execution["vectorize"], task.execution["vectorize_evaluation"]
    assert training["source"] == evaluation["source"] == "measured"  # two measurements, two cache entries
    cached = json.loads((fresh_choices / vectorize_module.CACHE_FILE).read_text())
    assert len(cached) == 2 and sum('"phase": "evaluation"' in key for key in cached) == 1
    task.vectorize = not evaluation["vectorize"]  # the other mode computes the same predictions
    with torch.no_grad():
        assert torch.allclose(task.predict(episode), outputs, atol=1e-5)
    given = MAML(vectorize=False, **TINY)
    given.resolve_evaluation_vectorize(episode)
    assert "vectorize_evaluation" not in given.execution and given.resolve_evaluation_vectorize(episode) is False
