"""Matching Networks (Vinyals, Blundell, Lillicrap, Kavukcuoglu & Wierstra 2016, "Matching Networks for One Shot Learning").

A query's prediction is a mixture of the support labels, ``P(y | x, S) = sum_i a(x, x_i) y_i`` (Eq. 1),
weighted by attention: a softmax over the cosine similarities between the query's embedding and
each support embedding (Eq. 2). Training minimises the negative log-likelihood of the true label
under that mixture on episodes drawn like the test episodes.

Full context embeddings (Sec. 2.1.2, Appendix A.1-A.2), switched on by ``full_context``: the support
embeddings are re-read by a bidirectional LSTM, ``g(x_i, S) = h_fwd_i + h_bwd_i + g'(x_i)``, and each
query embedding is refined by an attention LSTM for ``read_steps`` (K) steps over the support set:
``h_k, c_k = LSTM(f'(x), [h_{k-1}, r_{k-1}], c_{k-1}); h_k += f'(x); r_k = sum_i softmax(h_k . g(x_i)) g(x_i)``.

Defaults: Conv-4 with 64 filters (the paper's Omniglot embedding, no fine-tuning), cosine attention
without a temperature (``cosine_scale=1``, Eq. 2; Chen et al. 2019 multiply by 100 in their
re-implementation), Adam at 1e-3. The paper does not give K; we read ``read_steps=5`` times.
Conv-4's embeddings are non-negative (ReLU), so their cosines lie in [0, 1] and at scale 1 a 5-way
attention gives the true class at most e / (e + 4) = 40%: the loss cannot fall below ~0.9 and training
is slow. ``cosine_scale=100`` lifts Omniglot 5w1s from 82% to 95% at an equal budget (suite
``matching-scale``), and omniglot-paper uses it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from datamodules.episodes import Episode
from tasks.backbones import Conv4
from tasks.base import EpisodicTask
from tasks.embedding import embed_episode, one_hot_labels

# Probabilities are clamped here before the log, so a query with all its mass on wrong classes has a finite loss.
MIN_PROBABILITY = 1e-8


def cosine_attention(queries: torch.Tensor, support: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Attention ``[tasks, q, n]`` of each query over the support set: softmax of ``scale * cos(query, support_i)``."""
    similarity = F.normalize(queries, dim=-1) @ F.normalize(support, dim=-1).transpose(1, 2)
    return torch.softmax(scale * similarity, dim=-1)


class FullContextEmbedding(nn.Module):
    """The full context embeddings g(x_i, S) and f(x, S) of Matching Networks (Appendix A of the paper).

    The attention LSTM's recurrent state ``[h_{k-1}, r_{k-1}]`` is realised as hidden state ``h_{k-1}``
    plus the read-out ``r_{k-1}`` concatenated to the input ``f'(x)``: an LSTM's gates are linear in the
    concatenation of input and state, so this is the paper's cell with a hidden size equal to the
    embedding size (which the skip connection ``h_k + f'(x)`` needs).
    """

    def __init__(self, dim: int, read_steps: int) -> None:
        super().__init__()
        if read_steps < 1:
            raise ValueError(f"read_steps must be at least 1 (got {read_steps})")
        self.support_lstm = nn.LSTM(dim, dim, batch_first=True, bidirectional=True)
        self.query_cell = nn.LSTMCell(2 * dim, dim)
        self.read_steps = read_steps

    def embed_support(self, support: torch.Tensor) -> torch.Tensor:
        """``g(x_i, S)`` for support embeddings ``[tasks, n, dim]``: bidirectional LSTM plus skip connection."""
        outputs, _ = self.support_lstm(support)
        forward, backward = outputs.chunk(2, dim=-1)
        return support + forward + backward

    def embed_queries(self, queries: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
        """``f(x, S)`` for query embeddings ``[tasks, q, dim]``, attending over context support embeddings ``[tasks, n, dim]``."""
        tasks, n_query, dim = queries.shape
        inputs = queries.reshape(tasks * n_query, dim)
        hidden = torch.zeros_like(inputs)
        cell = torch.zeros_like(inputs)
        for _ in range(self.read_steps):
            weights = torch.softmax(hidden.view(tasks, n_query, dim) @ support.transpose(1, 2), dim=-1)
            read = (weights @ support).reshape(tasks * n_query, dim)
            hidden, cell = self.query_cell(torch.cat([inputs, read], dim=-1), (hidden, cell))
            hidden = hidden + inputs
        return hidden.view(tasks, n_query, dim)


class MatchingNet(EpisodicTask):
    """Matching Networks on a Conv-4 embedding (see module docstring).

    Args:
        full_context: use full context embeddings (bidirectional support LSTM, attention query LSTM).
        read_steps: K, the attention LSTM's read steps (only with ``full_context``).
        cosine_scale: multiplies the cosine similarities before the attention softmax (1 = the paper).
    """

    def __init__(self, ways: int = 5, in_channels: int = 1, image_size: int = 28, hidden: int = 64,
                 full_context: bool = False, read_steps: int = 5, cosine_scale: float = 1.0,
                 lr: float = 1e-3, lr_decay_every: int = 0, lr_decay: float = 0.5) -> None:
        super().__init__(ways=ways, lr=lr, lr_decay_every=lr_decay_every, lr_decay=lr_decay)
        self.save_hyperparameters()
        self.encoder = Conv4(in_channels, hidden, image_size)
        self.context = FullContextEmbedding(self.encoder.output_dim, read_steps) if full_context else None
        self.cosine_scale = cosine_scale

    def attention(self, episode: Episode) -> torch.Tensor:
        """Attention ``[tasks, q, n]`` of every query over its episode's support set (rows sum to 1)."""
        support, queries = embed_episode(self.encoder, episode)
        if self.context is not None:
            support = self.context.embed_support(support)
            queries = self.context.embed_queries(queries, support)
        return cosine_attention(queries, support, self.cosine_scale)

    def log_probabilities(self, episode: Episode) -> torch.Tensor:
        """``log P(y | x, S)`` ``[tasks, q, ways]``: the log of the attention-weighted support label mixture."""
        mixture = self.attention(episode) @ one_hot_labels(episode.support_y, episode.ways, episode.support_x.dtype)
        return mixture.clamp_min(MIN_PROBABILITY).log()

    def embedding_network(self) -> nn.Module:
        return self.encoder

    def training_loss(self, episode: Episode) -> tuple[torch.Tensor, torch.Tensor]:
        log_probabilities = self.log_probabilities(episode)
        loss = F.nll_loss(log_probabilities.flatten(0, 1), episode.query_y.flatten())
        return loss, log_probabilities

    def predict(self, episode: Episode) -> torch.Tensor:
        return self.log_probabilities(episode)
