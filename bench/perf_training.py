"""Meta-iterations for ``make perf``: ours, learn2learn's, and the plain supervised proxy.

One meta-iteration is end to end: sample the meta-batch, bring its pixels to the device, compute the
meta-loss, backpropagate, take the Adam step. Ours runs the library's own task classes
(:class:`tasks.maml.MAML`, :class:`tasks.protonet.ProtoNet`) exactly as training does. learn2learn
runs its ``MAML`` wrapper with the clone / adapt loop of its examples, and Prototypical Networks as
its example script writes them, both on its TaskDataset pipeline (:mod:`bench.perf_sampling`) and
its own Conv-4 (``l2l.vision.models.CNN4Backbone`` with max-pooling, plus a linear head), i.e. what a
learn2learn user runs. The proxy pushes the same images through one ordinary supervised step of our
network.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from bench.perf_sampling import l2l_in_memory_taskset, our_episodes, split_l2l_task
from datamodules.base import EpisodicDataModule
from datamodules.episodes import Episode
from tasks.backbones import Classifier, Conv4
from tasks.maml import MAML
from tasks.protonet import ProtoNet, prototypes, squared_distances

INNER_LR, META_LR = 0.4, 1e-3


def our_maml(datamodule: EpisodicDataModule, tasks: int, hidden: int, first_order: bool, device: torch.device,
             vectorize: bool | str = "auto", channels_last: bool | None = None,
             precision: str = "32") -> tuple[MAML, Callable[[], None]]:
    """Our MAML (or FOMAML) and one end-to-end meta-iteration of it (``precision`` as a run's: "32" or
    "bf16-mixed", the loss computed under autocast to bfloat16 as Lightning does)."""
    channels, size = datamodule.store.image_shape[0], datamodule.store.image_shape[1]
    task = MAML(ways=datamodule.train_ways, in_channels=channels, image_size=size, hidden=hidden, inner_lr=INNER_LR,
                inner_steps=1, first_order=first_order, vectorize=vectorize, lr=META_LR).to(device)
    task.network.backbone.channels_last = channels_last
    return task, _training_step(task, our_episodes(datamodule, tasks, device), precision)


def our_protonet(datamodule: EpisodicDataModule, hidden: int, device: torch.device,
                 channels_last: bool | None = None, precision: str = "32") -> tuple[ProtoNet, Callable[[], None]]:
    """Our Prototypical Networks and one end-to-end training step on one episode (``precision`` as in
    :func:`our_maml`)."""
    channels, size = datamodule.store.image_shape[0], datamodule.store.image_shape[1]
    task = ProtoNet(ways=datamodule.train_ways, in_channels=channels, image_size=size, hidden=hidden,
                    lr=META_LR).to(device)
    task.encoder.channels_last = channels_last
    return task, _training_step(task, our_episodes(datamodule, 1, device), precision)


def _training_step(task, next_episode: Callable[[], Episode], precision: str = "32") -> Callable[[], None]:
    optimizer = torch.optim.Adam(task.parameters(), lr=META_LR)
    device_type = next(task.parameters()).device.type

    def step() -> None:
        episode = next_episode()
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
            loss, _ = task.training_loss(episode)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def supervised_proxy(datamodule: EpisodicDataModule, tasks: int, hidden: int, device: torch.device,
                     per_task: bool, compile_network: bool = False) -> Callable[[], None]:
    """The meta-batch's images (support and query) through one plain supervised step of the same network.

    ``per_task=False``: one batch of all images. ``per_task=True``: one forward / backward per task's
    images (BatchNorm statistics per task, as MAML computes them), gradients accumulated, one step.
    ``compile_network``: run the network through ``torch.compile``.
    """
    channels, size = datamodule.store.image_shape[0], datamodule.store.image_shape[1]
    backbone = Conv4(channels, hidden, size, track_running_stats=False)
    network = Classifier(backbone, backbone.output_dim, datamodule.train_ways).to(device)
    optimizer = torch.optim.Adam(network.parameters(), lr=META_LR)
    next_episode = our_episodes(datamodule, tasks, device)
    forward = torch.compile(network) if compile_network else network

    def step() -> None:
        episode = next_episode()
        images = torch.cat([episode.support_x, episode.query_x], dim=1)
        labels = torch.cat([episode.support_y, episode.query_y], dim=1)
        optimizer.zero_grad(set_to_none=True)
        if per_task:
            for task_images, task_labels in zip(images, labels):
                (F.cross_entropy(forward(task_images), task_labels) / tasks).backward()
        else:
            F.cross_entropy(forward(images.flatten(0, 1)), labels.flatten()).backward()
        optimizer.step()

    return step


def l2l_maml(datamodule: EpisodicDataModule, tasks: int, hidden: int, first_order: bool, device: torch.device,
             initial: torch.nn.Module | None = None, taskset=None) -> tuple[torch.nn.Module, Callable[[], None]]:
    """learn2learn's MAML on its TaskDataset: per task ``clone()``, ``adapt()``, query loss, ``backward()``.

    ``taskset``: where its tasks come from -- by default a TaskDataset over our decoded images in memory;
    pass :func:`bench.perf_sampling.l2l_stock_omniglot_taskset` for learn2learn's own PNG pipeline.
    """
    import learn2learn as l2l

    network = l2l_conv4(datamodule, hidden, datamodule.train_ways, initial).to(device)
    maml = l2l.algorithms.MAML(network, lr=INNER_LR, first_order=first_order)
    optimizer = torch.optim.Adam(maml.parameters(), lr=META_LR)
    sampler = datamodule.samplers["train"]
    if taskset is None:
        taskset = l2l_in_memory_taskset(datamodule, sampler.ways, sampler.examples_per_class)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        for _ in range(tasks):
            support_x, support_y, query_x, query_y = split_l2l_task(*taskset.sample(), sampler.shots, device)
            learner = maml.clone()
            learner.adapt(F.cross_entropy(learner(support_x), support_y))
            (F.cross_entropy(learner(query_x), query_y) / tasks).backward()
        optimizer.step()

    return network, step


def l2l_protonet(datamodule: EpisodicDataModule, hidden: int, device: torch.device, taskset=None) -> Callable[[], None]:
    """Prototypical Networks as learn2learn's example writes them, on its TaskDataset (one episode a step;
    ``taskset`` as in :func:`l2l_maml`)."""
    encoder = l2l_conv4(datamodule, hidden, None).to(device)
    optimizer = torch.optim.Adam(encoder.parameters(), lr=META_LR)
    sampler = datamodule.samplers["train"]
    ways, shots, per_class = sampler.ways, sampler.shots, sampler.examples_per_class
    if taskset is None:
        taskset = l2l_in_memory_taskset(datamodule, ways, per_class)

    def step() -> None:
        data, labels = taskset.sample()
        embeddings = encoder(data.to(device)).view(ways, per_class, -1)  # each class's examples consecutive
        labels = labels.to(device).view(ways, per_class)
        support = embeddings[:, :shots].reshape(1, ways * shots, -1)
        queries = embeddings[:, shots:].reshape(1, -1, embeddings.shape[-1])
        centres = prototypes(support, labels[:, :shots].reshape(1, -1), ways)
        logits = -squared_distances(queries, centres)[0]
        loss = F.cross_entropy(logits, labels[:, shots:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def l2l_conv4(datamodule: EpisodicDataModule, hidden: int, ways: int | None,
              initial: torch.nn.Module | None = None) -> torch.nn.Module:
    """learn2learn's Conv-4 (conv, BatchNorm, ReLU, max-pool x 4), with a linear head of ``ways`` outputs
    unless ``ways`` is None; ``initial`` (our Classifier) gives it our weights, for like-for-like checks."""
    from learn2learn.vision.models import CNN4Backbone

    channels, size = datamodule.store.image_shape[0], datamodule.store.image_shape[1]
    body = CNN4Backbone(hidden_size=hidden, layers=4, channels=channels, max_pool=True)
    features = Conv4(channels, hidden, size).output_dim
    network = body if ways is None else torch.nn.Sequential(body, torch.nn.Linear(features, ways))
    if initial is not None:
        theirs = dict(network.named_parameters())
        with torch.no_grad():
            for name, value in initial.named_parameters():
                theirs[_l2l_name(name)].copy_(value)
    return network


def _l2l_name(ours: str) -> str:
    """Our Classifier's parameter name -> the name in :func:`l2l_conv4` with a head."""
    parts = ours.split(".")
    if parts[0] == "head":
        return f"1.{parts[1]}"
    block, layer, kind = parts[2], parts[3], parts[4]  # backbone.blocks.<i>.<0 conv | 1 norm>.<weight | bias>
    return f"0.{block}.{'conv' if layer == '0' else 'normalize'}.{kind}"


def same_meta_gradient(datamodule: EpisodicDataModule, tasks: int, hidden: int, first_order: bool,
                       device: torch.device, vectorize: bool, dtype: torch.dtype,
                       channels_last: bool | None = None) -> dict[str, float]:
    """Max |difference| between our and learn2learn's meta-gradients on one meta-batch from the same weights,
    absolute and relative to the largest |meta-gradient| entry.

    Ours runs as benchmarked (channels-last on CPU; loop or vmap as given), learn2learn as above. In float64
    this checks the mathematics; in float32 the difference also holds the kernels' different rounding.
    """
    import learn2learn as l2l

    task, _ = our_maml(datamodule, tasks, hidden, first_order, device, vectorize=vectorize, channels_last=channels_last)
    task = task.to(dtype)
    episode = our_episodes(datamodule, tasks, device, seed=123)()
    episode.support_x, episode.query_x = episode.support_x.to(dtype), episode.query_x.to(dtype)
    loss, _ = task.training_loss(episode)
    ours = torch.autograd.grad(loss, list(task.network.parameters()))
    reference = l2l.algorithms.MAML(l2l_conv4(datamodule, hidden, datamodule.train_ways, task.network).to(device),
                                    lr=INNER_LR, first_order=first_order).to(dtype)
    total = 0.0
    for t in range(tasks):
        learner = reference.clone()
        learner.adapt(F.cross_entropy(learner(episode.support_x[t]), episode.support_y[t]))
        total = total + F.cross_entropy(learner(episode.query_x[t]), episode.query_y[t])
    names = [_l2l_name(name) for name, _ in task.network.named_parameters()]
    by_name = dict(zip([n for n, _ in reference.module.named_parameters()],
                       torch.autograd.grad(total / tasks, list(reference.module.parameters()))))
    theirs = [by_name[name] for name in names]
    difference = max(float((a - b).abs().max()) for a, b in zip(ours, theirs))
    scale = max(float(b.abs().max()) for b in theirs)
    return {"max_abs": difference, "relative": difference / scale, "tasks": tasks, "dtype": str(dtype),
            "layout": {None: "as benchmarked", True: "channels-last", False: "default"}[channels_last]}
