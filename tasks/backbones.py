"""Backbones shared by all algorithms.

Conv-4 is the four-block network of Vinyals et al. 2016 (Matching Networks), used unchanged by
Finn et al. 2017 (MAML) and Snell et al. 2017 (Prototypical Networks): each block is a 3x3
convolution with ``hidden`` filters, BatchNorm, ReLU and 2x2 max-pooling.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

import torch
from torch import nn

_UNDER_TASK_VMAP = contextvars.ContextVar("metabench_under_task_vmap", default=False)


@contextlib.contextmanager
def _raised(flag: contextvars.ContextVar) -> Iterator[None]:
    """Set a boolean context flag for the duration of a ``with`` block."""
    token = flag.set(True)
    try:
        yield
    finally:
        flag.reset(token)


def under_task_vmap() -> contextlib.AbstractContextManager[None]:
    """Marks code that runs under ``torch.func.vmap`` over the tasks of a meta-batch.

    Inside, batch-statistics BatchNorm is computed from primitive tensor ops: vmap gives wrong
    second-order gradients through PyTorch's fused ``native_batch_norm`` (its double-backward batching
    rule; the loss and first-order gradients are right, the meta-gradient of the parameters before a
    BatchNorm is off by ~1e-2, torch 2.14), while mean / variance / affine ops differentiate correctly
    at any order. Outside, the fused kernel is used (faster, and identical to learn2learn's reference
    loop). Conv-4 also keeps the default memory layout inside (vmap cannot re-stride a batched tensor).
    """
    return _raised(_UNDER_TASK_VMAP)


def inside_task_vmap() -> bool:
    """Whether the caller runs inside :func:`under_task_vmap`."""
    return _UNDER_TASK_VMAP.get()


_DIFFERENTIATED_TWICE = contextvars.ContextVar("metabench_differentiated_twice", default=False)


def differentiated_twice() -> contextlib.AbstractContextManager[None]:
    """Marks a forward pass whose graph will be differentiated twice: the support pass of a second-order
    inner step (MAML, Meta-SGD), whose gradient keeps its graph for the meta-gradient. Conv-4 picks its
    memory layout for such a pass by itself (see :meth:`Conv4.uses_channels_last`)."""
    return _raised(_DIFFERENTIATED_TWICE)


def batch_stats_norm(inputs: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                     eps: float) -> torch.Tensor:
    """BatchNorm with the current batch's statistics (biased variance), in primitive ops.

    Normalises ``inputs [N, C, *spatial]`` per channel over the batch and spatial dimensions, then
    applies the per-channel affine map -- exactly what ``F.batch_norm(training=True)`` computes.
    """
    dims = [0, *range(2, inputs.dim())]
    variance, mean = torch.var_mean(inputs, dim=dims, correction=0, keepdim=True)
    normalised = (inputs - mean) * torch.rsqrt(variance + eps)
    shape = (1, -1) + (1,) * (inputs.dim() - 2)
    if weight is not None:
        normalised = normalised * weight.view(shape)
    if bias is not None:
        normalised = normalised + bias.view(shape)
    return normalised


class BatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` that switches to :func:`batch_stats_norm` inside :func:`under_task_vmap`.

    Only batch-statistics normalisation is switched (``track_running_stats=False``, or training
    mode); parameter names and state dicts are those of ``nn.BatchNorm2d``.
    """

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if _UNDER_TASK_VMAP.get() and (self.training or not self.track_running_stats):
            if self.track_running_stats:
                raise RuntimeError(
                    "vectorised adaptation cannot update BatchNorm running statistics per task; build the "
                    "network with track_running_stats=False (as MAML does) or use vectorize=False")
            return batch_stats_norm(inputs, self.weight, self.bias, self.eps)
        return super().forward(inputs)


def conv_block(in_channels: int, out_channels: int, track_running_stats: bool = True) -> nn.Sequential:
    """Convolution, BatchNorm, ReLU and 2x2 max-pooling -- with the pooling computed before the ReLU.

    ``max(relu(a), relu(b), ...) == relu(max(a, b, ...))`` exactly (ReLU is monotone), and the
    gradients agree too (both route to the window's first maximum, and are zero where it is <= 0), so
    this is the same function; the ReLU and its backward then touch a quarter of the elements.
    """
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
        BatchNorm2d(out_channels, track_running_stats=track_running_stats),
        nn.MaxPool2d(2),
        nn.ReLU(inplace=False),
    )


def conv4_output_size(image_size: int, blocks: int = 4) -> int:
    """Spatial side after ``blocks`` conv blocks (each pooling halves, rounding down)."""
    for _ in range(blocks):
        image_size //= 2
    return image_size


class Conv4(nn.Module):
    """Conv-4 feature extractor: ``[B, C, H, W] -> [B, hidden * s * s]`` (flattened).

    ``track_running_stats=False`` makes BatchNorm always use the current batch's statistics, as
    in MAML's reference implementation; it is also what makes the network a pure function of its
    parameters for ``torch.func`` transforms.

    ``channels_last`` runs the blocks on channels-last (NHWC) activations; ``None`` (default) does so
    on CPU, where oneDNN's convolution, BatchNorm and pooling kernels are markedly faster in that
    layout (``make perf`` measures it: leaderboard/perf.md), and keeps PyTorch's default elsewhere --
    except for a pass :func:`differentiated_twice`, which keeps the default layout on CPU too. There
    PyTorch's channels-last BatchNorm is both slower and less accurate: its double backward runs ~2.7x
    slower (one 28x28 layer of 100 images), and its float32 gradients are rounded far more coarsely (one
    layer: ~1e-5 relative error at 100 images of 28x28, ~1e-4 at 400, against ~1e-7 in the default
    layout; Conv-4's whole gradient: 1e-3 to 5e-3 from 25 images up, against ~2e-6). First-order training
    shrugs that off; second-order MAML amplifies it: a 20-way 5-shot meta-gradient was 11% off the
    float64 one in channels-last, 3e-6 off in the default layout (``tests/test_vectorize.py``). Second-
    order MAML trains faster this way at 20 ways or 5 shots (one thread: 5w5s 1.14x, 20w1s with 5 inner
    steps 1.15x, 20w5s 1.42x; in bfloat16 too) and level at 5-way 1-shot, whose 5 support images give
    BatchNorm little to reduce. Only the memory layout changes, not the function computed.
    """

    def __init__(self, in_channels: int = 1, hidden: int = 64, image_size: int = 28,
                 blocks: int = 4, track_running_stats: bool = True, channels_last: bool | None = None) -> None:
        super().__init__()
        channels = [in_channels] + [hidden] * blocks
        self.blocks = nn.Sequential(*[conv_block(channels[i], channels[i + 1], track_running_stats) for i in range(blocks)])
        self.output_dim = hidden * conv4_output_size(image_size, blocks) ** 2
        self.channels_last = channels_last

    def uses_channels_last(self, images: torch.Tensor) -> bool:
        """Whether a forward pass on ``images`` runs channels-last (the class docstring says when)."""
        if _UNDER_TASK_VMAP.get():
            return False
        if self.channels_last is not None:
            return self.channels_last
        return images.device.type == "cpu" and not _DIFFERENTIATED_TWICE.get()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.uses_channels_last(images):
            # .to() (not .contiguous()) also re-strides single-channel images, whose NCHW strides would
            # otherwise count as channels-last and send every layer down the NCHW path.
            images = images.to(memory_format=torch.channels_last)
        return self.blocks(images).flatten(1)


class Classifier(nn.Module):
    """A backbone followed by a linear head (the network MAML-family algorithms adapt)."""

    def __init__(self, backbone: nn.Module, feature_dim: int, outputs: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(feature_dim, outputs)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(inputs))
