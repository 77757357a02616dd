"""Relational temporal graph for CORECT (emotion recognition in conversation), built with tensor ops.

Conventions
-----------
* A batch holds ``B`` dialogues with utterance counts ``lengths`` (LongTensor ``(B,)``, each >= 1).
  Utterances are *packed*: dialogue 0's utterances first, then dialogue 1's, ...;
  ``U = lengths.sum()``.
* Node numbering is **modality-major**: the node of packed utterance ``u`` in modality ``m`` has index
  ``m * U + u`` (see :func:`node_index`), so there are ``M * U`` nodes and node features are the
  per-modality ``(U, D)`` blocks stacked along dim 0.
* ``edge_index`` follows PyG: row 0 is the source, row 1 the target; messages flow source -> target.

Relations (``n_relations(M) = 3M + M(M-1)``)
--------------------------------------------
* Temporal, within one modality ``m`` and one dialogue: target utterance ``j`` receives from every
  utterance ``i`` of the same dialogue with ``j - wp <= i <= j + wf`` (``i == j`` included).
  Type ``3m + 0`` if ``i < j`` (from the past), ``3m + 1`` if ``i == j``, ``3m + 2`` if ``i > j``
  (from the future). ``wf = 0`` means no edge ever comes from a later utterance.
* Cross-modal: for every utterance ``u`` and ordered pair of distinct modalities ``(m1, m2)``, one
  edge from node ``(u, m1)`` to node ``(u, m2)``, type ``3M + k`` where ``k`` is the index of
  ``(m1, m2)`` in ``list(itertools.permutations(range(M), 2))``.

Edge ordering
-------------
:func:`build_graph` returns edges sorted by target node, then by source node (both ascending), so
every node's incoming edges are contiguous; this order is deterministic and has no duplicates.
"""

from __future__ import annotations

import functools
import operator

import torch

from affectkit.errors import ConfigError

__all__ = ["build_graph", "build_graph_loop", "n_relations", "node_index"]


def n_relations(n_modalities: int) -> int:
    """Number of edge types for ``n_modalities`` modalities: 3 temporal per modality + ordered pairs."""
    m = _check_int(n_modalities, "n_modalities", minimum=1)
    return 3 * m + m * (m - 1)


def node_index(u: int | torch.Tensor, m: int | torch.Tensor, n_utterances: int) -> int | torch.Tensor:
    """Node index of packed utterance ``u`` in modality ``m`` (modality-major: ``m * U + u``)."""
    return m * n_utterances + u


def _check_int(value: object, name: str, minimum: int) -> int:
    """Return ``value`` as a plain int >= ``minimum`` or raise a one-line ConfigError."""
    if isinstance(value, bool):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    try:
        ivalue = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise ConfigError(f"{name} must be an integer, got {value!r}") from None
    if ivalue < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {ivalue}")
    return ivalue


def _check_args(lengths: torch.Tensor, n_modalities: int, wp: int, wf: int) -> tuple[int, int, int]:
    """Validate the inputs shared by both builders; return (n_modalities, wp, wf) as ints."""
    if not isinstance(lengths, torch.Tensor):
        raise ConfigError(f"lengths must be a 1-D integer tensor, got {type(lengths).__name__}")
    if (
        lengths.dim() != 1
        or lengths.dtype.is_floating_point
        or lengths.dtype.is_complex
        or lengths.dtype == torch.bool
    ):
        raise ConfigError(
            f"lengths must be a 1-D integer tensor, got shape {tuple(lengths.shape)} dtype {lengths.dtype}"
        )
    if lengths.numel() == 0:
        raise ConfigError("lengths is empty: a batch needs at least one dialogue")
    if bool((lengths < 1).any()):
        raise ConfigError(f"every dialogue length must be >= 1, got min {int(lengths.min())}")
    m = _check_int(n_modalities, "n_modalities", minimum=1)
    return m, _check_int(wp, "wp", minimum=0), _check_int(wf, "wf", minimum=0)


@functools.lru_cache(maxsize=64)
def _slot_tables(
    n_modalities: int, wp: int, wf: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Per (target modality m2, slot k) tables, cached because they depend only on (M, wp, wf, device).

    Each target node ``(u, m2)`` owns a row of ``K = wp + wf + 1 + (M - 1)`` candidate slots laid out in
    ascending source order: cross-modal sources ``m1 < m2``, temporal offsets ``-wp..wf`` within
    modality ``m2``, cross-modal sources ``m1 > m2``. Returns ``(src_mod * 2**bits, offset * 2**bits +
    type, offset[:, None, :], bits)``: source modality, temporal offset (0 for cross-modal slots) and
    relation type, with the type packed into the low ``bits`` bits so one masked_select moves both.
    Callers must not modify the returned tensors in place.
    """
    width = wp + wf + 1
    m2 = torch.arange(n_modalities, device=device).unsqueeze(1)  # (M, 1)
    k = torch.arange(width + n_modalities - 1, device=device).unsqueeze(0)  # (1, K)
    temporal = (k >= m2) & (k < m2 + width)
    src_mod = torch.where(k < m2, k, torch.where(temporal, m2, k - width + 1))  # (M, K)
    offset = torch.where(temporal, k - m2 - wp, 0)  # (M, K)
    # Temporal: 3*m2 + sign(offset) + 1; cross-modal: 3M + index of (m1, m2) in permutations(range(M), 2).
    perm_idx = src_mod * (n_modalities - 1) + torch.where(m2 < src_mod, m2, m2 - 1)
    slot_type = torch.where(temporal, 3 * m2 + torch.sign(offset) + 1, 3 * n_modalities + perm_idx)
    bits = n_relations(n_modalities).bit_length()
    scale = 1 << bits
    return src_mod * scale, offset * scale + slot_type, offset.unsqueeze(1), bits


def build_graph(
    lengths: torch.Tensor, n_modalities: int, wp: int, wf: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Build CORECT's relational temporal graph for a packed batch, fully vectorised.

    Returns ``(edge_index, edge_type)``: LongTensors of shape ``(2, E)`` and ``(E,)`` on
    ``lengths.device``, sorted by target then source (see the module docstring for conventions).

    How: every target node ``(u, m2)`` gets a fixed row of ``K`` candidate slots in ascending source
    order (see :func:`_slot_tables`); a temporal slot with offset ``d`` is kept iff ``u + d`` lies in
    ``u``'s dialogue, cross-modal slots are always kept. One ``masked_select`` over the ``(M, U, K)``
    grid of packed ``source * 2**bits + type`` values then yields the edges already in (target, source)
    order, and the targets come from ``repeat_interleave`` of the per-row counts: no sort, and no Python
    loop over edges, utterances or dialogues.
    """
    n_mod, wp, wf = _check_args(lengths, n_modalities, wp, wf)
    device = lengths.device
    lengths = lengths.to(torch.long)
    n_utt = int(lengths.sum())
    # Offsets beyond the longest dialogue can never be valid: clamp so the (M, U, K) grid stays small.
    max_len = int(lengths.max())
    src_mod_sh, offset_type, offset, bits = _slot_tables(
        n_mod, min(wp, max_len - 1), min(wf, max_len - 1), device
    )

    # Per packed utterance u: allowed temporal offsets are lo <= d < hi (stay inside u's dialogue).
    ends = torch.cumsum(lengths, 0)
    dial = torch.repeat_interleave(torch.arange(lengths.numel(), device=device), lengths, output_size=n_utt)
    utt = torch.arange(n_utt, device=device)
    lo = ((ends - lengths)[dial] - utt).view(1, -1, 1)
    hi = (ends[dial] - utt).view(1, -1, 1)
    valid = (offset >= lo) & (offset < hi)  # (M, U, K); cross-modal slots have offset 0: always valid

    # Packed (source node, type) per slot: source = src_mod * U + u + offset.
    slot_packed = (src_mod_sh * n_utt + offset_type).unsqueeze(1)  # (M, 1, K)
    packed = ((utt << bits).view(1, -1, 1) + slot_packed).masked_select(valid)
    edge_index = torch.empty((2, packed.numel()), dtype=torch.long, device=device)
    torch.bitwise_right_shift(packed, bits, out=edge_index[0])
    edge_index[1] = torch.repeat_interleave(valid.sum(-1).view(-1), output_size=packed.numel())
    return edge_index, packed.bitwise_and_((1 << bits) - 1)


def build_graph_loop(
    lengths: torch.Tensor, n_modalities: int, wp: int, wf: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dialogue Python loop building the same edge set as :func:`build_graph`.

    Kept as the readable, obviously-correct reference for the tests and the benchmark; it is far
    too slow for training. Its edge order is not guaranteed: compare edge sets, not sequences.
    """
    n_mod, wp, wf = _check_args(lengths, n_modalities, wp, wf)
    n_utt = int(lengths.sum())
    pairs = [(m1, m2) for m1 in range(n_mod) for m2 in range(n_mod) if m1 != m2]  # permutations order
    src: list[int] = []
    dst: list[int] = []
    types: list[int] = []
    start = 0
    for length in lengths.tolist():
        for m in range(n_mod):
            for j in range(length):  # target utterance (position in dialogue)
                for i in range(max(0, j - wp), min(length - 1, j + wf) + 1):  # source utterance
                    src.append(m * n_utt + start + i)
                    dst.append(m * n_utt + start + j)
                    types.append(3 * m + (0 if i < j else 1 if i == j else 2))
        for u in range(start, start + length):
            for idx, (m1, m2) in enumerate(pairs):
                src.append(m1 * n_utt + u)
                dst.append(m2 * n_utt + u)
                types.append(3 * n_mod + idx)
        start += length
    edge_index = torch.tensor([src, dst], dtype=torch.long, device=lengths.device).view(2, -1)
    return edge_index, torch.tensor(types, dtype=torch.long, device=lengths.device)
