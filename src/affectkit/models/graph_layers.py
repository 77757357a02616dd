"""The two graph layers of CORECT, written for its relational temporal graph (:mod:`affectkit.graph`).

Each computes what its PyTorch Geometric counterpart does (same parameters, names and initialisation, so
their checkpoints load), in fewer and denser operations:

* :class:`RelationalConv` is ``RGCNConv(in, out, R)`` (mean over the edges of each relation, root weight,
  bias): one matmul for all relations, one gather and one ``index_add`` instead of a loop over relations;
* :class:`GraphAttention` is ``TransformerConv(in, out, heads, concat=True)`` (root weight, no edge
  features): per dialogue, one masked scaled-dot-product attention among its nodes (a node attends to the
  nodes it has an edge from) instead of per-edge tensors of (E, heads, out) kept for backward.

Nodes are modality-major (node ``m * U + u``); a graph's edges never leave a dialogue.
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import nn
from torch.nn import functional as F


def _glorot(t: torch.Tensor) -> None:
    bound = math.sqrt(6.0 / (t.shape[-2] + t.shape[-1]))
    nn.init.uniform_(t, -bound, bound)


class RelationalConv(nn.Module):
    """Relational GCN layer: ``x_i W_root + b + sum_r mean_{j -r-> i} x_j W_r`` (PyG's ``RGCNConv``)."""

    def __init__(self, in_dim: int, out_dim: int, n_relations: int) -> None:
        super().__init__()
        self.n_relations = n_relations
        self.weight = nn.Parameter(torch.empty(n_relations, in_dim, out_dim))
        self.root = nn.Parameter(torch.empty(in_dim, out_dim))
        self.bias = nn.Parameter(torch.zeros(out_dim))
        _glorot(self.weight)
        _glorot(self.root)

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor, edge_type: torch.Tensor) -> torch.Tensor:
        n, r = x.shape[0], self.n_relations
        src, dst = edge_index[0], edge_index[1]
        w = self.weight.permute(1, 0, 2).reshape(x.shape[1], -1)  # (in, R * out)
        msg = (x @ w).view(n, r, -1)[src, edge_type]  # (E, out): x_src W_type
        key = dst * r + edge_type
        norm = torch.bincount(key, minlength=n * r).clamp_min_(1)[key].to(msg.dtype).reciprocal_()
        out = msg.new_zeros((n, msg.shape[1])).index_add_(0, dst, msg * norm[:, None])
        return out + x @ self.root + self.bias


def dialogue_layout(lengths: torch.Tensor, n_modalities: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Nodes in dialogue-major order: ``perm`` (N,) lists dialogue 0's nodes (modality-major within it), then
    dialogue 1's, ...; ``where`` (N,) is each node's position in that order; and the node count per dialogue."""
    lens = lengths.to(torch.long)
    u = int(lens.sum())
    b = lens.shape[0]
    starts = torch.cumsum(lens, 0) - lens
    dialogue = torch.repeat_interleave(torch.arange(b, device=lens.device), lens)  # (U,)
    p = torch.arange(u, device=lens.device) - starts[dialogue]
    m = torch.arange(n_modalities, device=lens.device)[:, None]
    # dialogue-major position of node (m, u): nodes of earlier dialogues, then m * L_b + p
    where = (n_modalities * starts[dialogue] + m * lens[dialogue] + p).reshape(-1)
    perm = torch.empty_like(where)
    perm[where] = torch.arange(where.shape[0], device=lens.device)
    return perm, where, (n_modalities * lens).tolist()


class GraphAttention(nn.Module):
    """Graph transformer layer (PyG's ``TransformerConv`` with ``concat=True``, root weight, no edge features):
    node i attends to the nodes j with an edge j -> i, ``softmax_j(q_i . k_j / sqrt(out)) v_j`` per head,
    heads concatenated, plus ``lin_skip(x_i)``.  A node without incoming edges gets the skip term only."""

    def __init__(self, in_dim: int, out_dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.out_dim = heads, out_dim
        self.lin_key = nn.Linear(in_dim, heads * out_dim)
        self.lin_query = nn.Linear(in_dim, heads * out_dim)
        self.lin_value = nn.Linear(in_dim, heads * out_dim)
        self.lin_skip = nn.Linear(in_dim, heads * out_dim)
        for lin in (self.lin_key, self.lin_query, self.lin_value, self.lin_skip):
            lin.reset_parameters()  # PyG initialises them at construction and again in the layer: same draws

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor, lengths: torch.Tensor,
                n_modalities: int) -> torch.Tensor:
        """``x`` (M * U, in) nodes of dialogues of ``lengths`` utterances -> (M * U, heads * out)."""
        perm, where, sizes = dialogue_layout(lengths, n_modalities)
        cells_at = [0, *itertools.accumulate(s * s for s in sizes)]  # host-side bounds: no device syncs below
        offsets = torch.tensor([0, *sizes], device=x.device).cumsum(0)
        cells = torch.tensor(cells_at, device=x.device)
        # the adjacency of each dialogue, flattened one after another: cell (target, source) of dialogue b
        src, dst = where[edge_index[0]], where[edge_index[1]]
        b = torch.searchsorted(offsets, dst, right=True) - 1
        size = offsets[1:] - offsets[:-1]
        adj = torch.zeros(cells_at[-1], dtype=torch.bool, device=x.device)
        adj[cells[b] + (dst - offsets[b]) * size[b] + (src - offsets[b])] = True
        q, k, v = (lin(x)[perm] for lin in (self.lin_query, self.lin_key, self.lin_value))
        has_in = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        has_in[dst] = True
        h, c = self.heads, self.out_dim
        out, start = [], 0
        for i, s in enumerate(sizes):
            mask = adj[cells_at[i]:cells_at[i + 1]].view(s, s)
            lonely = ~has_in[start:start + s]
            if bool(lonely.any()):  # no incoming edge: attend to itself (no NaN), zeroed below
                mask = mask | torch.diag(lonely)

            def part(t: torch.Tensor, start: int = start, s: int = s) -> torch.Tensor:
                return t[start:start + s].view(s, h, c).transpose(0, 1)

            y = F.scaled_dot_product_attention(part(q), part(k), part(v), attn_mask=mask)
            out.append(y.transpose(0, 1).reshape(s, h * c))
            start += s
        y = torch.cat(out)  # dialogue-major, as has_in
        if not bool(has_in.all()):
            y = y * has_in[:, None].to(y.dtype)
        return y[where] + self.lin_skip(x)
