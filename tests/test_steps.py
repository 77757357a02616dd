"""The step state's bookkeeping (``affectkit.models.steps``) on hand-made rings: stacking sessions for a
batched step and splitting them again keeps every stored row, and a split session keeps only the slots it
needs (a fixed window keeps its own capacity)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from affectkit.models.steps import Ring, StepState, _grown


def _ring(window: int | None, capacity: int | None, n: int, dim: int = 4, key: str = "k") -> Ring:
    """One session with positions 0..n-1 stepped in; the row of position p holds p + 1 in every column."""
    r = Ring(1, window, capacity, torch.device("cpu"))
    for p in range(n):
        r.begin(torch.tensor([p]))
        r.write(key, torch.full((1, 1, dim), float(p + 1)))
        r.end()
    return r


def _stored(r: Ring, key: str = "k", i: int = 0) -> dict[int, float]:
    """position -> its row's value, for session ``i``."""
    return {int(p): float(r.rows[key][i, s, 0]) for s, p in enumerate(r.slot_pos[i].tolist()) if p >= 0}


def test_grown_doubles_from_sixteen():
    assert [_grown(16, p) for p in (0, 15, 16, 31, 32, 100)] == [16, 16, 32, 32, 64, 128]
    assert _grown(0, 0) == 16 and _grown(4, 3) == 4


@given(st.integers(0, 5000), st.integers(0, 10**6))
def test_grown_equals_doubling_until_the_position_fits(capacity, pos):
    want = capacity
    while want <= pos:
        want = max(16, 2 * want)
    assert _grown(capacity, pos) == want


def test_stack_of_one_state_is_that_state():
    s = StepState(torch.tensor([3]), {"attention": _ring(None, None, 3)})
    one = StepState.stack([s])
    assert one.lengths.tolist() == [3] and _stored(one.rings["attention"]) == {0: 1.0, 1: 2.0, 2: 3.0}


def test_stack_pads_grown_rings_whatever_the_row_width():
    """Sessions whose unbounded rings grew to different capacities stack side by side (the shorter padded),
    also when the row width equals the larger capacity."""
    short, long_ = _ring(None, None, 3, dim=32), _ring(None, None, 20, dim=32)
    assert (short.capacity, long_.capacity) == (16, 32)
    both = Ring.stack([short, long_])
    assert both.capacity == 32 and both.rows["k"].shape == (2, 32, 32)
    assert _stored(both, i=0) == _stored(short) and _stored(both, i=1) == _stored(long_)
    fresh = Ring(1, None, None, torch.device("cpu"))  # a session with no rows yet
    mixed = Ring.stack([fresh, short])
    assert mixed.rows["k"].shape == (2, 16, 32) and _stored(mixed, i=1) == _stored(short)
    assert not bool((mixed.slot_pos[0] >= 0).any())


def test_split_keeps_what_each_session_needs():
    """An unbounded ring splits into the capacity its session's length needs (16, doubled as it grows);
    a fixed ring keeps its capacity, however short the session."""
    lengths = (1, 16, 17, 40)
    rings = [_ring(None, None, n) for n in lengths]
    stacked = StepState(torch.tensor(lengths), {"attention": Ring.stack(rings)})
    parts = stacked.split()
    assert [p.rings["attention"].capacity for p in parts] == [16, 16, 32, 64]
    for part, ring, n in zip(parts, rings, lengths):
        assert part.lengths.tolist() == [n] and _stored(part.rings["attention"]) == _stored(ring)
    fixed = [_ring(24, 24, n) for n in (1, 30)]
    parts = StepState(torch.tensor([1, 30]), {"graph": Ring.stack(fixed)}).split()
    assert [p.rings["graph"].capacity for p in parts] == [24, 24]
    assert all(p.rings["graph"].fixed for p in parts)
    assert [_stored(p.rings["graph"]) for p in parts] == [_stored(r) for r in fixed]


def test_take_is_a_copy():
    r = Ring.stack([_ring(None, None, 2), _ring(None, None, 3)])
    one = r.take(1, 16)
    one.rows["k"][0, 0] = -1.0
    assert float(r.rows["k"][1, 0, 0]) == 1.0 and one.slot_pos.shape == (1, 16)


def test_shift_relabels_a_tail_to_its_true_positions():
    """A fixed ring stepped through positions 0..2 and shifted by 3 holds what a ring stepped through
    0..5 holds for positions 3..5, slot for slot (slot = position % capacity)."""
    cap = 4
    tail = Ring(1, 3, cap, torch.device("cpu"))
    full = Ring(1, 3, cap, torch.device("cpu"))
    for p in range(6):
        full.begin(torch.tensor([p]))
        full.write("k", torch.full((1, 1, 2), float(100 + p)))
        full.end()
        if p >= 3:
            tail.begin(torch.tensor([p - 3]))
            tail.write("k", torch.full((1, 1, 2), float(100 + p)))
            tail.end()
    tail.shift(3)
    for p in range(3, 6):
        s = p % cap
        assert int(tail.slot_pos[0, s]) == p == int(full.slot_pos[0, s])
        assert torch.equal(tail.rows["k"][0, s], full.rows["k"][0, s])
    assert sorted(int(p) for p in tail.slot_pos[0] if p >= 0) == [3, 4, 5]
    tail.shift(0)
    assert sorted(int(p) for p in tail.slot_pos[0] if p >= 0) == [3, 4, 5]


def test_shift_moves_every_session_of_a_batch():
    a, b = _ring(3, 4, 3), _ring(3, 4, 2)
    both = Ring.stack([a, b])
    both.shift(5)
    assert _stored(both, i=0) == {5: 1.0, 6: 2.0, 7: 3.0} and _stored(both, i=1) == {5: 1.0, 6: 2.0}
    assert [int(both.slot_pos[1, p % 4]) for p in (5, 6)] == [5, 6]
    full = Ring.stack([_ring(3, 4, 3), _ring(3, 4, 4)])  # the second session fills its last slot
    full.shift(5)
    assert _stored(full, i=0) == {5: 1.0, 6: 2.0, 7: 3.0} and _stored(full, i=1) == {5: 1.0, 6: 2.0, 7: 3.0, 8: 4.0}


def test_a_chunk_after_a_rewind_never_reads_the_stale_rows():
    """Rewound to 3 with rows of 3..5 still in the ring, a chunk of positions 3..5 reads stored 0..2 and its
    own rows, never the stale 3..5."""
    r = _ring(None, None, 6)
    r.begin(torch.tensor([3]), 3)
    mask = r.mask()
    assert mask.shape == (1, 1, 3, 16 + 3)
    stored, own = mask[0, 0, :, :16], mask[0, 0, :, 16:]
    for q in range(3):  # query of position 3 + q
        read = {int(r.slot_pos[0, s]) for s in range(16) if bool(stored[q, s])}
        assert read == {0, 1, 2}
        assert own[q].tolist() == [j <= q for j in range(3)]


def test_a_rewind_is_exact_only_while_the_rows_a_step_reads_are_held():
    """``can_rewind(n)``: a step at ``n`` reads the window's ``n - window + 1 .. n - 1`` (all earlier ones
    without a window); a fixed ring of 6 slots for a window of 4 keeps them for two rewinds, no further; a
    grown ring keeps every position it has room for, and none it has not seen yet."""
    assert Ring(1, 4, 6, torch.device("cpu")).needed(10) == range(7, 10)
    assert Ring(1, 4, 6, torch.device("cpu")).needed(2) == range(0, 2)
    assert Ring(1, None, None, torch.device("cpu")).needed(3) == range(0, 3)
    fixed = StepState(torch.tensor([10]), {"attention": _ring(4, 6, 10)})  # holds positions 4..9
    assert [fixed.can_rewind(n) for n in (10, 9, 8, 7, 6, 5)] == [True, True, True, True, False, False]
    grown = StepState(torch.tensor([16]), {"attention": _ring(None, None, 16)})  # 16 slots, all used
    assert grown.rings["attention"].capacity == 16
    assert [grown.can_rewind(n) for n in (0, 1, 15, 16)] == [True, True, True, True]
    assert grown.can_rewind(17) is False  # position 16 was never stored (nor room made for it)


def _corect(**over):
    from affectkit.models import build_model

    params = {"hidden": 8, "text_ff": 16, "text_layers": 2, "text_heads": 2, "graph_heads": 1, "pcm_heads": 1,
              "wp": 3, "wf": 0, "causal": True, "context": 4, "modalities": ["text", "audio"], **over}
    info = {"dims": {"text": 4, "audio": 3, "visual": 5}, "n_classes": 2, "label_names": ["a", "b"], "n_speakers": 2}
    return build_model("corect", params, info)


def test_state_reach_by_hand():
    """How far back a state's rows look: (context - 1) per banded attention layer on the longest path (text
    stack, then P-CM's cross and self layers), plus the graph's wp; None without a window if anything attends."""
    m = _corect()
    cfg = m.cfg
    text = cfg.text_layers * 3 if m.text_context is not None else 0
    pcm = (cfg.pcm_layers + cfg.pcm_self_layers) * 3
    assert m.pcm is not None and m.state_reach() == text + pcm + 3
    assert _corect(use_pcm=False).state_reach() == text + 3
    assert _corect(use_pcm=False, use_gnn=False).state_reach() == text
    assert _corect(use_gnn=False, context=1).state_reach() == 0
    assert _corect(context=None).state_reach() is None
    assert _corect(context=None, modalities=["audio"]).state_reach() == 3  # nothing attends: the graph alone
    assert _corect(context=None, modalities=["text"]).state_reach() is None  # the text stack alone attends
    assert _corect(context=None, modalities=["audio", "visual"]).state_reach() is None  # P-CM alone attends
    no_text = _corect(modalities=["audio", "visual"])  # no text stack: its layers add nothing
    assert no_text.text_context is None and no_text.state_reach() == pcm + 3


def test_cross_modal_attention_reads_the_other_modality():
    """P-CM's text part is text attending to audio: it changes with the audio, not only with the text."""
    from affectkit.models.attention import Ragged

    m = _corect().eval()
    torch.manual_seed(0)
    text, audio = torch.randn(5, 8), torch.randn(5, 8)  # one dialogue of 5 utterances, packed rows
    seqs = Ragged(torch.ones(1, 5, dtype=torch.bool), causal=True, context=4)
    width = m.pcm.out_dim // 2
    with torch.no_grad():
        a = m.pcm([text, audio], seqs)
        b = m.pcm([text, audio + torch.randn(5, 8)], seqs)  # (a constant shift would vanish in a LayerNorm)
    assert not torch.allclose(a[..., :width], b[..., :width], atol=1e-4)  # text <- audio
    assert not torch.allclose(a[..., width:], b[..., width:], atol=1e-4)  # audio <- text, fused with audio


@pytest.mark.parametrize("sink", [False, True])
def test_padding_never_reaches_a_dialogue_in_the_offline_model(sink):
    """Whole-dialogue (non-causal) P-CM: a short dialogue batched beside a long one (so padded in every
    attention) gives what it gives alone, with or without the attention sink."""
    from affectkit.models.attention import Ragged

    m = _corect(causal=False, context=None, wf=2, attention_sink=sink).eval()
    torch.manual_seed(1)
    for name, p in m.named_parameters():
        if name.endswith(".sink"):
            p.data.normal_()
    long_, short = [torch.randn(6, 8) for _ in range(2)], [torch.randn(3, 8) for _ in range(2)]
    rows = torch.tensor([[True] * 6, [True] * 3 + [False] * 3])
    with torch.no_grad():
        together = m.pcm([torch.cat([a, b]) for a, b in zip(long_, short)], Ragged(rows))
        alone = m.pcm(short, Ragged(torch.ones(1, 3, dtype=torch.bool)))
    torch.testing.assert_close(together[6:], alone, atol=1e-5, rtol=1e-5)


def test_packed_attention_stays_within_each_dialogue_and_its_window():
    """Packed rows (:class:`Ragged`): a position reads only its own dialogue; causal with ``context`` 2, only
    itself and the one before; without ``causal`` (the default), every position of its dialogue."""
    from affectkit.models.attention import Ragged

    rows = torch.tensor([[True, True, True, True], [True, True, False, False]])  # packed: 0..3, then 4, 5
    torch.manual_seed(2)
    x = torch.randn(6, 4)
    poked = x.clone()
    poked[0] += 1.0  # the first utterance of the first dialogue

    def changed(seqs: Ragged) -> list[bool]:
        a, b = seqs.attend(x, x, x, 2, 0.0), seqs.attend(poked, poked, poked, 2, 0.0)
        return [not torch.allclose(a[i], b[i]) for i in range(6)]

    assert changed(Ragged(rows, causal=True, context=2)) == [True, True, False, False, False, False]
    assert changed(Ragged(rows, causal=True)) == [True, True, True, True, False, False]
    assert changed(Ragged(rows)) == [True, True, True, True, False, False]
    late = x.clone()
    late[3] += 1.0  # the last utterance of the first dialogue: seen by the earlier ones only when not causal
    a, b = Ragged(rows).attend(x, x, x, 2, 0.0), Ragged(rows).attend(late, late, late, 2, 0.0)
    assert not torch.allclose(a[0], b[0])
    c, d = Ragged(rows, True).attend(x, x, x, 2, 0.0), Ragged(rows, True).attend(late, late, late, 2, 0.0)
    torch.testing.assert_close(c[:3], d[:3])
    dropped = Ragged(rows).attend(x, x, x, 2, 0.9)  # attention dropout (training) is applied in packed mode
    assert not torch.allclose(dropped, a)


def test_an_empty_state_is_one_session_sized_by_the_model():
    """``init_state()``: one session, rings of ``context`` (attention) and ``wp + 1`` (graph) slots, plus
    ``rewind`` spare ones; refused for a model that is not causal (one that looks ahead, wf > 0, cannot be)."""
    import pytest

    from affectkit.errors import ConfigError

    m = _corect()  # context 4, wp 3
    state = m.init_state()
    assert state.batch == 1 and state.lengths.tolist() == [0]
    assert (state.rings["attention"].capacity, state.rings["graph"].capacity) == (4, 4)
    again = m.init_state(3, rewind=2)
    assert again.batch == 3 and (again.rings["attention"].capacity, again.rings["graph"].capacity) == (6, 6)
    refused = r"^only a causal model \(model.causal: true, wf: 0\) can step utterance by utterance$"
    for model in (_corect(causal=False, context=None), _corect(causal=False, context=None, wf=2)):
        with pytest.raises(ConfigError, match=refused):
            model.init_state()


def test_a_padded_stack_masks_as_the_packed_one_does():
    """A stack on padded (B, T) sequences with a causal window computes, on the real positions, what the packed
    stack computes: padding and later positions hidden alike."""
    from affectkit.models.attention import Ragged, TransformerStack

    torch.manual_seed(4)
    rows = torch.tensor([[True, True, True, False], [True, True, True, True]])
    x = torch.randn(2, 4, 8)
    for sink in (False, True):
        stack = TransformerStack(8, 2, 16, 0.0, 2, sink=sink).eval()
        with torch.no_grad():
            for layer in stack.layers if sink else ():
                layer.attn.sink.normal_()
            for causal, context in ((True, 2), (False, None)):  # not causal: only ``valid`` hides the padding
                padded = stack(x, rows, causal, context)
                packed = stack(x[rows], None, causal, context, seqs=Ragged(rows, causal, context))
                torch.testing.assert_close(padded[rows], packed, atol=1e-5, rtol=1e-5)


def test_the_sink_is_one_more_key_and_value_by_hand():
    """One head, one query, one key: the output is the softmax-weighted mix of the key's value and the sink's
    value, then the output projection; packed rows give the same; a sink of zeros still takes weight."""
    import math

    from affectkit.models.attention import MultiHeadAttention, Ragged

    torch.manual_seed(6)
    mha = MultiHeadAttention(4, 1, sink=True).eval()
    with torch.no_grad():
        mha.sink.normal_()
        x = torch.randn(1, 1, 4)
        q, k, v = mha.q(x)[0, 0], mha.k(x)[0, 0], mha.v(x)[0, 0]
        sk, sv = mha.sink
        w = torch.softmax(torch.stack([q @ k, q @ sk]) / math.sqrt(4), dim=0)
        expected = mha.out(w[0] * v + w[1] * sv)
        torch.testing.assert_close(mha(x, x, None)[0, 0], expected)
        torch.testing.assert_close(mha(x[0], x[0], None, seqs=Ragged(torch.ones(1, 1, dtype=torch.bool)))[0],
                                   expected)
        mha.sink.zero_()  # logit 0 and a zero value: the key's value at weight 1 / (1 + exp(-q.k / 2))
        w0 = torch.sigmoid(q @ k / 2)
        torch.testing.assert_close(mha(x, x, None)[0, 0], mha.out(w0 * v))
    assert MultiHeadAttention(4, 1).sink is None  # off by default: no parameter


def test_a_scaled_stack_is_the_plain_stack_on_scaled_inputs():
    """``scale`` (MulT): inputs and the cross-attention's keys/values multiplied by sqrt(dim) = 2 first."""
    from affectkit.models.attention import TransformerStack

    torch.manual_seed(5)
    scaled = TransformerStack(4, 2, 8, 0.0, 1, scale=True).eval()
    plain = TransformerStack(4, 2, 8, 0.0, 1).eval()
    plain.load_state_dict(scaled.state_dict())
    assert scaled.input_scale == 2.0 and plain.input_scale == 1.0
    x, kv = torch.randn(2, 3, 4), torch.randn(2, 5, 4)
    with torch.no_grad():
        torch.testing.assert_close(scaled(x, None, False), plain(2 * x, None, False))
        torch.testing.assert_close(scaled(x, None, False, kv=kv), plain(2 * x, None, False, kv=2 * kv))


def test_attention_dropout_applies_while_training_only():
    """Padded and packed alike: in eval mode attention is deterministic; in training its dropout changes it."""
    from affectkit.models.attention import MultiHeadAttention, Ragged

    torch.manual_seed(3)
    mha = MultiHeadAttention(8, 2, dropout=0.9)
    x = torch.randn(1, 5, 8)
    seqs = Ragged(torch.ones(1, 5, dtype=torch.bool), causal=True)
    mha.eval()
    a, packed = mha(x, x, None), mha(x[0], x[0], None, seqs=seqs)
    torch.testing.assert_close(mha(x, x, None), a)
    mha.train()
    assert not torch.allclose(mha(x, x, None), a)
    assert not torch.allclose(mha(x[0], x[0], None, seqs=seqs), packed)


def test_a_step_is_refused_by_a_model_that_is_not_causal_or_given_ragged_sessions():
    from types import SimpleNamespace

    import pytest

    from affectkit.errors import ConfigError

    state = _corect().init_state(2)
    refused = r"^only a causal model \(model.causal: true\) can step utterance by utterance$"
    with pytest.raises(ConfigError, match=refused):
        _corect(causal=False, context=None).forward(SimpleNamespace(mask=torch.ones(2, 1, dtype=torch.bool)), state)
    for mask in (torch.ones(2, dtype=torch.bool), torch.ones(3, 1, dtype=torch.bool),
                 torch.tensor([[True, False], [True, True]])):
        with pytest.raises(ConfigError, match=r"same number of utterances from each session: mask of shape \(2, "):
            _corect().forward(SimpleNamespace(mask=mask), state)


def test_first_appearance_slots_by_hand():
    from affectkit.models.corect import first_appearance_slots

    speakers = torch.tensor([[2, 0, 2, 1, 0], [1, 1, 0, 0, 0]])
    valid = torch.tensor([[True] * 5, [True, True, True, False, False]])
    got = first_appearance_slots(speakers, valid, 3)
    assert got.tolist() == [[0, 1, 0, 2, 1], [0, 0, 1, 0, 0]]  # padding gets 0


def test_a_states_bytes_are_its_rings_and_its_lengths():
    # by hand: a ring of 1 session x 4 slots holds slot_pos (4 int64: 32 B) and, once written, a (1, 4, 2)
    # float32 buffer (32 B); two such rings and the lengths of one session (one int64: 8 B)
    rings = {"a": _ring(3, 4, 2, dim=2), "b": _ring(3, 4, 1, dim=2)}
    state = StepState(torch.tensor([2]), rings)
    assert [r.nbytes() for r in rings.values()] == [64, 64]
    assert state.nbytes() == 64 + 64 + 8
