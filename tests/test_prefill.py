"""Rebuilding a session from its log by prefill (``Stream.prefill``): after any log length, the session
answers exactly as one stepped utterance by utterance, for every model switch; only the log's tail is
computed when the model has a window; bad input changes nothing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_stream import ATOL, INFO, _dialogue, _kwargs, _model

from affectkit.errors import DataError
from affectkit.stream import SessionFullError, Stream

SWITCHES = {
    "all": {},
    "text": {"modalities": ["text"]},
    "audio+visual": {"modalities": ["audio", "visual"]},
    "no-gnn": {"use_gnn": False},
    "no-pcm": {"use_pcm": False},
    "no-views": {"use_gnn": False, "use_pcm": False},
    "no-speaker": {"use_speaker": False},
    "wp0": {"wp": 0},
    "wp11": {"wp": 11, "hidden": 12, "graph_heads": 3, "text_layers": 1, "pcm_self_layers": 3},
    "per-dialogue": {"speaker_mode": "per_dialogue"},
    "text-per-dialogue": {"modalities": ["text"], "speaker_mode": "per_dialogue"},
}


def _logits(session: Stream, d, ts: range) -> np.ndarray:
    return np.array([session.push(**_kwargs(d, t)).logits for t in ts])


def _pair(params: dict, context: int | None, max_rewind: int, d, n: int, chunk: int) -> tuple[Stream, Stream]:
    """A session stepped through ``d[:n]`` and one prefilled from it, on the same model."""
    stepped = Stream((_model(**params, context=context), INFO), max_rewind=max_rewind)
    for t in range(n):
        stepped.push(**_kwargs(d, t))
    rebuilt = stepped.new_session()
    rebuilt.prefill([_kwargs(d, t) for t in range(n)], chunk=chunk)
    return stepped, rebuilt


@settings(max_examples=40, deadline=None)
@given(switch=st.sampled_from(sorted(SWITCHES)), context=st.sampled_from([None, 1, 2, 3, 6]),
       max_rewind=st.integers(0, 3), n=st.integers(0, 45), chunk=st.sampled_from([1, 2, 5, 16, 256]),
       seed=st.integers(0, 2**16))
def test_prefill_then_push_equals_stepping_through_the_log(switch, context, max_rewind, n, chunk, seed):
    """Logs of any length (past ring wrap-around, beyond twice every window), any chunk size: the next
    predictions (as many as the largest window, so every held row is read) equal the stepped session's."""
    d = _dialogue(np.random.default_rng(seed), n + 14)
    stepped, rebuilt = _pair(SWITCHES[switch], context, max_rewind, d, n, chunk)
    assert len(rebuilt) == n and rebuilt.state_bytes == stepped.state_bytes
    assert rebuilt.speaker_slots == stepped.speaker_slots
    np.testing.assert_allclose(_logits(rebuilt, d, range(n, n + 14)), _logits(stepped, d, range(n, n + 14)),
                               atol=ATOL, rtol=0)


@pytest.mark.parametrize("switch", sorted(SWITCHES))
@pytest.mark.parametrize("context", [3, None])
def test_a_prefilled_session_rewinds_as_a_stepped_one(switch, context):
    """Every row the state keeps is exact, not only those the next step reads: rewinding within
    ``max_rewind`` after a prefill gives the stepped session's answers."""
    d = _dialogue(np.random.default_rng(1), 40)
    stepped, rebuilt = _pair(SWITCHES[switch], context, 3, d, 30, 7)
    stepped.rewind(27)
    rebuilt.rewind(27)
    np.testing.assert_allclose(_logits(rebuilt, d, range(27, 33)), _logits(stepped, d, range(27, 33)),
                               atol=ATOL, rtol=0)


def test_with_a_window_only_the_tail_is_computed(monkeypatch):
    """With ``context`` the rebuild runs capacity + reach utterances however long the log, in the
    forwards asked for; without it, the whole log."""
    calls: list[int] = []
    windowed = Stream((_model(context=3), INFO), max_rewind=2)
    forward = type(windowed.engine.model).forward

    def counting(self, batch, state=None):
        calls.append(int(batch.mask.shape[1]))
        return forward(self, batch, state)

    monkeypatch.setattr(type(windowed.engine.model), "forward", counting)
    d = _dialogue(np.random.default_rng(2), 500)
    log = [_kwargs(d, t) for t in range(500)]
    windowed.prefill(log, chunk=40)
    reach = windowed.engine.model.state_reach()  # text 2 layers + P-CM 2 + 2 layers, 2 back each; graph wp 4
    assert reach == (2 + 2 + 2) * 2 + 4
    kept = max(3 + 2, 4 + 1 + 2)  # the largest ring: attention context 3, graph wp + 1 = 5; + 2 rewind slots
    assert sum(calls) == kept + reach and max(calls) <= 40
    assert windowed.engine.prefill_start(500) == 500 - sum(calls)
    calls.clear()
    whole = Stream((_model(), INFO))
    whole.prefill(log[:120], chunk=50)
    assert calls == [50, 50, 20]


def test_bad_input_names_the_utterance_and_leaves_the_session_empty():
    session = Stream((_model(context=3, speaker_mode="per_dialogue"), INFO), max_rewind=2)
    d = _dialogue(np.random.default_rng(3), 10)
    log = [_kwargs(d, t) for t in range(10)]
    bad = [*log[:6], {**log[6], "text": np.zeros(3)}, *log[7:]]
    with pytest.raises(DataError, match=r"^utterance 6: text features have shape \(3,\)"):
        session.prefill(bad)
    assert len(session) == 0 and session.speaker_slots == {}
    nan = log[8]["audio"].copy()
    nan[1] = np.nan
    with pytest.raises(DataError, match=r"^utterance 8: audio features hold 1 non-finite values"):
        session.prefill([*log[:8], {**log[8], "audio": nan}, *log[9:]])
    assert len(session) == 0 and session.speaker_slots == {}
    with pytest.raises(DataError, match="utterance 2: an utterance needs 'speaker'"):
        session.prefill([*log[:2], {"text": log[2]["text"]}])
    with pytest.raises(DataError, match="chunk must be an int >= 1"):
        session.prefill(log, chunk=0)
    session.prefill(log)
    with pytest.raises(DataError, match="prefill rebuilds an empty session; this one has 10 utterances"):
        session.prefill(log)


def test_too_many_speakers_in_the_log_is_refused():
    session = Stream((_model(speaker_mode="per_dialogue"), INFO))  # two speaker slots
    d = _dialogue(np.random.default_rng(4), 3)
    log = [{**_kwargs(d, t), "speaker": name} for t, name in enumerate(["ann", "bob", "cy"])]
    with pytest.raises(DataError, match=r"^utterance 2: speaker 'cy' would be the session's speaker number 3"):
        session.prefill(log)
    assert len(session) == 0


def test_a_state_over_its_cap_is_refused_and_the_session_stays_empty():
    session = Stream((_model(), INFO), max_state_bytes=64 * 1024)  # context null: the state grows
    d = _dialogue(np.random.default_rng(5), 400)
    with pytest.raises(SessionFullError, match="over max_state_bytes"):
        session.prefill([_kwargs(d, t) for t in range(400)])
    assert len(session) == 0 and session.state_bytes < 64 * 1024


def test_prefilled_sessions_batch_with_stepped_ones():
    """A rebuilt session's state is an ordinary state: push_batch mixes it with live ones."""
    from affectkit.stream import push_batch

    d = _dialogue(np.random.default_rng(6), 30)
    stepped, rebuilt = _pair({}, 4, 2, d, 20, 6)
    fresh = stepped.new_session()
    with torch.inference_mode():
        out = push_batch([rebuilt, fresh], [_kwargs(d, 20), _kwargs(d, 0)])
    alone = [stepped.push(**_kwargs(d, 20)), stepped.new_session().push(**_kwargs(d, 0))]
    for got, want in zip(out, alone):
        np.testing.assert_allclose(got.logits, want.logits, atol=ATOL, rtol=0)
        assert got.position == want.position
