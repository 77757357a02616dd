"""Tests for the CORECT relational temporal graph (affectkit.graph)."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from affectkit.graph import build_graph, build_graph_loop, n_relations, node_index


def triples(edge_index: torch.Tensor, edge_type: torch.Tensor) -> list[tuple[int, int, int]]:
    """Edges as a list of (src, dst, type) triples."""
    return list(zip(edge_index[0].tolist(), edge_index[1].tolist(), edge_type.tolist()))


def edge_set(lengths: list[int], m: int, wp: int, wf: int) -> set[tuple[int, int, int]]:
    """The vectorised builder's edges as a set, after checking shapes, dtypes and no duplicates."""
    edge_index, edge_type = build_graph(torch.tensor(lengths), m, wp, wf)
    assert edge_index.dtype == torch.long and edge_type.dtype == torch.long
    assert edge_index.dim() == 2 and edge_index.shape[0] == 2
    assert edge_type.shape == (edge_index.shape[1],)
    out = triples(edge_index, edge_type)
    assert len(set(out)) == len(out), "duplicate edges"
    return set(out)


# ---------------------------------------------------------------- hand-written graphs


def test_one_dialogue_one_modality_past_only() -> None:
    # Utterances 0,1,2; j receives from j-1 (past, type 0) and from itself (same, type 1).
    expected = {
        (0, 0, 1),
        (0, 1, 0),
        (1, 1, 1),
        (1, 2, 0),
        (2, 2, 1),
    }
    assert edge_set([3], 1, wp=1, wf=0) == expected


def test_one_dialogue_one_modality_future_only() -> None:
    # wp=0, wf=1: j receives from itself (type 1) and from j+1 (future, type 2).
    expected = {
        (0, 0, 1),
        (1, 0, 2),
        (1, 1, 1),
        (2, 1, 2),
        (2, 2, 1),
    }
    assert edge_set([3], 1, wp=0, wf=1) == expected


def test_two_modalities_length_two_full_window() -> None:
    # U=2, nodes: (u0,m0)=0, (u1,m0)=1, (u0,m1)=2, (u1,m1)=3. Relations: m0 temporal 0/1/2,
    # m1 temporal 3/4/5, cross (0->1)=6, (1->0)=7.
    expected = {
        # modality 0 temporal
        (0, 0, 1),
        (1, 0, 2),  # target u0: self, from future u1
        (0, 1, 0),
        (1, 1, 1),  # target u1: from past u0, self
        # modality 1 temporal
        (2, 2, 4),
        (3, 2, 5),
        (2, 3, 3),
        (3, 3, 4),
        # cross-modal
        (0, 2, 6),
        (1, 3, 6),  # m0 -> m1
        (2, 0, 7),
        (3, 1, 7),  # m1 -> m0
    }
    assert edge_set([2], 2, wp=1, wf=1) == expected


def test_two_dialogues_with_hand_listed_edges() -> None:
    # Dialogues of lengths 2 and 1 (U=3), one modality, wide window: no edge joins packed 1 and 2.
    expected = {(0, 0, 1), (1, 0, 2), (0, 1, 0), (1, 1, 1), (2, 2, 1)}
    assert edge_set([2, 1], 1, wp=5, wf=5) == expected


def test_dialogues_never_link() -> None:
    lengths = [4, 1, 6, 3]
    dial = torch.repeat_interleave(torch.arange(4), torch.tensor(lengths))
    u_total = sum(lengths)
    for src, dst, _ in edge_set(lengths, 3, wp=10, wf=10):
        assert dial[src % u_total] == dial[dst % u_total]


@pytest.mark.parametrize("m", [2, 3, 4])
def test_cross_modal_types_match_itertools_permutations(m: int) -> None:
    pairs = list(itertools.permutations(range(m), 2))
    u_total = 5
    for src, dst, typ in edge_set([2, 3], m, wp=0, wf=0):
        m1, m2 = src // u_total, dst // u_total
        if m1 == m2:
            assert src == dst and typ == 3 * m1 + 1
        else:
            assert src % u_total == dst % u_total
            assert typ == 3 * m + pairs.index((m1, m2))


def test_node_index_is_modality_major() -> None:
    assert node_index(0, 0, 7) == 0
    assert node_index(3, 2, 7) == 17
    assert torch.equal(node_index(torch.tensor([1, 2]), 1, 7), torch.tensor([8, 9]))


# ---------------------------------------------------------------- direction


def _temporal_positions(lengths, m, wp, wf):
    """(source utterance, target utterance, type) for temporal edges only."""
    u_total = sum(lengths)
    out = []
    for src, dst, typ in edge_set(lengths, m, wp, wf):
        if typ < 3 * m:
            out.append((src % u_total, dst % u_total, typ))
    return out


@pytest.mark.parametrize("m", [1, 2, 3])
def test_wf_zero_no_edge_from_the_future(m: int) -> None:
    edges = _temporal_positions([5, 3, 8], m, wp=3, wf=0)
    assert edges
    assert all(src <= dst for src, dst, _ in edges)
    assert all(typ % 3 != 2 for _, _, typ in edges)


def test_wp2_wf0_target_never_earlier_than_source() -> None:
    edges = _temporal_positions([6, 2], 2, wp=2, wf=0)
    for src, dst, typ in edges:
        assert dst >= src
        assert dst - src <= 2
        assert typ % 3 == (0 if src < dst else 1)


def test_past_future_types() -> None:
    for src, dst, typ in _temporal_positions([7], 1, wp=3, wf=2):
        assert typ == (0 if src < dst else 1 if src == dst else 2)
        assert -2 <= dst - src <= 3


# ---------------------------------------------------------------- relations, order, device


@pytest.mark.parametrize(("m", "expected"), [(1, 3), (2, 8), (3, 15)])
def test_n_relations(m: int, expected: int) -> None:
    assert n_relations(m) == expected


def test_types_cover_all_relations() -> None:
    _, edge_type = build_graph(torch.tensor([4, 5]), 3, wp=2, wf=2)
    assert set(edge_type.tolist()) == set(range(n_relations(3)))


def test_order_is_sorted_by_target_then_source() -> None:
    lengths = torch.tensor([3, 7, 1, 4])
    edge_index, _ = build_graph(lengths, 3, wp=2, wf=1)
    n_nodes = 3 * int(lengths.sum())
    key = edge_index[1] * n_nodes + edge_index[0]
    assert bool((key[1:] > key[:-1]).all())


def test_deterministic_and_on_lengths_device() -> None:
    lengths = torch.tensor([3, 5], dtype=torch.int32)
    a = build_graph(lengths, 2, 1, 1)
    b = build_graph(lengths, 2, 1, 1)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert a[0].device == lengths.device and a[1].device == lengths.device


def test_single_utterance_single_modality_is_a_self_loop() -> None:
    edge_index, edge_type = build_graph(torch.tensor([1]), 1, 0, 0)
    assert edge_index.tolist() == [[0], [0]]
    assert edge_type.tolist() == [1]


# ---------------------------------------------------------------- property test vs loop


@settings(max_examples=100, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 30), min_size=1, max_size=12),
    m=st.integers(1, 3),
    wp=st.integers(0, 6),
    wf=st.integers(0, 6),
)
def test_vectorised_matches_loop(lengths: list[int], m: int, wp: int, wf: int) -> None:
    vec = edge_set(lengths, m, wp, wf)
    ref_index, ref_type = build_graph_loop(torch.tensor(lengths), m, wp, wf)
    ref = triples(ref_index, ref_type)
    assert len(set(ref)) == len(ref)
    assert vec == set(ref)


@pytest.mark.parametrize(
    ("lengths", "m", "wp", "wf"),
    [([5, 2, 9], 4, 2, 3), ([3, 1], 5, 0, 1), ([4, 6], 2, 10**6, 10**6), ([1, 1, 1], 3, 0, 0)],
)
def test_vectorised_matches_loop_edge_cases(lengths: list[int], m: int, wp: int, wf: int) -> None:
    # More than 3 modalities, windows far larger than any dialogue, single-utterance dialogues.
    ref_index, ref_type = build_graph_loop(torch.tensor(lengths), m, wp, wf)
    assert edge_set(lengths, m, wp, wf) == set(triples(ref_index, ref_type))


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("builder", [build_graph, build_graph_loop])
@pytest.mark.parametrize(
    ("lengths", "m", "wp", "wf", "match"),
    [
        (torch.tensor([3]), 1, -1, 0, "wp must be >= 0"),
        (torch.tensor([3]), 1, 0, -2, "wf must be >= 0"),
        (torch.tensor([3]), 0, 1, 1, "n_modalities must be >= 1"),
        (torch.tensor([], dtype=torch.long), 1, 1, 1, "^lengths is empty: a batch needs at least one dialogue$"),
        (torch.tensor([3, 0]), 1, 1, 1, "length must be >= 1"),
        (torch.tensor([3, -2]), 1, 1, 1, "length must be >= 1"),
        (torch.tensor([3.0]), 1, 1, 1, "1-D integer tensor"),
        (torch.tensor([[3]]), 1, 1, 1, "1-D integer tensor"),
        ([3], 1, 1, 1, "^lengths must be a 1-D integer tensor, got list$"),
        (torch.tensor([True]), 1, 1, 1, r"got shape \(1,\) dtype torch.bool"),
        (torch.tensor([2j]), 1, 1, 1, r"got shape \(1,\) dtype torch.complex64"),
        (torch.tensor([3]), 1, 1.5, 1, "wp must be an integer"),
        (torch.tensor([3]), True, 1, 1, "n_modalities must be an integer"),
    ],
)
def test_bad_input_raises(builder, lengths, m, wp, wf, match) -> None:
    with pytest.raises(ValueError, match=match):
        builder(lengths, m, wp, wf)


def test_n_relations_bad_input() -> None:
    with pytest.raises(ValueError, match="n_modalities must be >= 1"):
        n_relations(0)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8])
def test_any_integer_dtype_gives_the_long_graph(dtype) -> None:
    """Lengths of any integer dtype give the same graph as int64 lengths, as int64 tensors."""
    lengths = torch.tensor([4, 1, 3])
    want = build_graph(lengths, 2, 2, 1)
    got = build_graph(lengths.to(dtype), 2, 2, 1)
    for a, b in zip(want, got):
        assert b.dtype == torch.long and torch.equal(a, b)
