"""A SYNTHETIC spoken corpus: two-party dialogues spoken by espeak-ng, labels planted in prosody and words.

There is no labelled real speech on our machines, so the audio path (segmenter -> transcriber ->
prosody -> model) is proven on speech whose emotion is *made*: each of the four IEMOCAP-4 classes is
spoken at its own pitch, rate and loudness (hap high and quick, sad low and slow, ang loud and fast,
neu in between) and with words of its own, labels follow a sticky chain as in real conversations.  A
model that learns these cues says nothing about real speech: accuracy on real speech is not measured.

Written to a folder: ``utterances/*.wav`` (one per utterance, 16 kHz), ``tracks/DIALOGUE_SPEAKER.wav``
(one track per participant: their turns in place, near-silence while the other speaks, as a meeting
records them), ``manifest.csv`` (file, dialogue, position, speaker, label, split, text, track_start,
track_end) and ``corpus.json`` (``"synthetic": true``, the command, seed, planted cues, the script).
Needs Debian's ``espeak-ng`` (``apt-get install espeak-ng``).
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
import wave
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from affectkit.audio import SAMPLE_RATE
from affectkit.audio.pcm import resample, write_wav
from affectkit.errors import ConfigError, DataError

__all__ = ["CLASSES", "SENTENCES", "SPEAKERS", "Voice", "speak", "write_spoken_corpus"]

CLASSES = ("hap", "sad", "neu", "ang")


@dataclass(frozen=True)
class Voice:
    """espeak-ng settings: ``pitch`` 0-99, ``rate`` words per minute, ``amplitude`` 0-200."""

    pitch: int
    rate: int
    amplitude: int


#: The planted prosody of each class.
CUES: dict[str, Voice] = {"hap": Voice(80, 185, 120), "sad": Voice(20, 120, 60), "neu": Voice(50, 155, 100),
                          "ang": Voice(45, 205, 190)}
#: The participants: name -> espeak-ng voice (their pitch is shifted a little from the class cue).
SPEAKERS: dict[str, tuple[str, int]] = {"A": ("en-us", 0), "B": ("en-gb", -6)}

# Short everyday sentences; six of a first draft that espeak-ng says badly (Whisper heard "to rain" as
# "terrain", "shared" as "Sharon") were replaced, so the bench's WER measures the pipeline more than
# espeak-ng's diction.
SENTENCES: dict[str, tuple[str, ...]] = {
    "hap": ("I am so happy to see you today.", "This is wonderful news.", "We won the game last night.",
            "Thank you, this is perfect.", "I love this place so much.", "What a great idea, let us do it.",
            "I passed the exam with top marks.", "The party was really fun."),
    "sad": ("I miss my old friends.", "Nobody came to the meeting.", "I lost my job last week.",
            "It has been a very long and lonely year.", "My dog is sick again.", "I feel tired and alone.",
            "We had to sell the house.", "I could not sleep at all."),
    "neu": ("The bus comes at ten.", "Please send me the report.", "The office is on the second floor.",
            "We can meet on Monday.", "I will call you after lunch.", "The notes are on my desk.",
            "It will be cold tomorrow.", "Let me check the calendar."),
    "ang": ("Stop doing that right now.", "This is not fair at all.", "You never listen to me.",
            "I told you this three times.", "Get out of my office.", "Who took my new phone?",
            "I am sick of your excuses.", "You are always late."),
}


def _espeak() -> str:
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise ConfigError("espeak-ng not found: install it (apt-get install espeak-ng)")
    return exe


def speak(text: str, voice: str = "en-us", pitch: int = 50, rate: int = 160, amplitude: int = 100) -> np.ndarray:
    """``text`` spoken by espeak-ng, as float32 16 kHz mono."""
    done = subprocess.run([_espeak(), "-v", voice, "-p", str(pitch), "-s", str(rate), "-a", str(amplitude),
                           "--stdout", text], capture_output=True, timeout=60, check=False)
    if done.returncode != 0 or not done.stdout:
        raise DataError(f"espeak-ng failed on {text!r}: {done.stderr.decode(errors='replace').strip()[:200]}")
    with wave.open(io.BytesIO(done.stdout)) as w:
        rate_hz = w.getframerate()
        x = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float32) / 32768.0
    return resample(x, rate_hz)


def _labels(rng: np.random.Generator, n: int, stay: float) -> list[str]:
    out = [str(rng.choice(CLASSES))]
    for _ in range(n - 1):
        out.append(out[-1] if rng.random() < stay else str(rng.choice(CLASSES)))
    return out


def write_spoken_corpus(out: str | Path, n_dialogues: Mapping[str, int] | None = None, turns: tuple[int, int] = (4, 8),
                        seed: int = 0, stay: float = 0.7, gap_s: tuple[float, float] = (0.8, 1.3),
                        noise: float = 3e-4, command: str | None = None) -> dict[str, Any]:
    """Write the corpus to folder ``out`` (see the module's docstring); returns the corpus.json content.
    ``n_dialogues``: per split (default train 24, dev 6, test 6); ``turns``: utterances per dialogue
    (inclusive range); ``gap_s``: silence between turns; ``noise``: the tracks' noise floor."""
    counts = {"train": 24, "dev": 6, "test": 6, **(dict(n_dialogues) if n_dialogues else {})}
    if any(k not in ("train", "dev", "test") or int(v) < 0 for k, v in counts.items()) or turns[0] < 1 \
            or turns[1] < turns[0]:
        raise ConfigError(f"bad corpus size: n_dialogues {counts}, turns {turns}")
    rng = np.random.default_rng(seed)
    root = Path(out)
    (root / "utterances").mkdir(parents=True, exist_ok=True)
    (root / "tracks").mkdir(exist_ok=True)
    rows: list[dict[str, Any]] = []
    script: list[dict[str, Any]] = []
    for split, n in counts.items():
        for d in range(int(n)):
            vid = f"{split}{d:03d}"
            length = int(rng.integers(turns[0], turns[1] + 1))
            labels = _labels(rng, length, stay)
            first = int(rng.integers(0, 2))
            names = list(SPEAKERS)
            t = float(rng.uniform(0.5, 1.0))
            clips: list[tuple[str, float, np.ndarray]] = []
            for pos, label in enumerate(labels):
                speaker = names[(first + pos) % 2] if rng.random() < 0.85 or pos == 0 else clips[-1][0]
                voice, shift = SPEAKERS[speaker]
                cue = CUES[label]
                text = str(rng.choice(SENTENCES[label]))
                audio = speak(text, voice, int(np.clip(cue.pitch + shift + rng.integers(-4, 5), 0, 99)),
                              int(cue.rate + rng.integers(-10, 11)), cue.amplitude)
                name = f"utterances/{vid}_{pos:02d}.wav"
                write_wav(root / name, audio)
                rows.append({"file": name, "dialogue": vid, "position": pos, "speaker": speaker, "label": label,
                             "split": split, "text": text, "track_start": round(t, 3),
                             "track_end": round(t + len(audio) / SAMPLE_RATE, 3)})
                clips.append((speaker, t, audio))
                t += len(audio) / SAMPLE_RATE + float(rng.uniform(*gap_s))
            total = int((t + 0.5) * SAMPLE_RATE)
            for speaker in SPEAKERS:
                track = (rng.standard_normal(total) * noise).astype(np.float32)
                for who, start, audio in clips:
                    if who == speaker:
                        k = int(start * SAMPLE_RATE)
                        track[k:k + len(audio)] += audio
                write_wav(root / "tracks" / f"{vid}_{speaker}.wav", track)
            script.append({"dialogue": vid, "split": split,
                           "turns": [{k: r[k] for k in ("speaker", "label", "text", "track_start", "track_end")}
                                     for r in rows[-length:]]})
    with (root / "manifest.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["file"])
        w.writeheader()
        w.writerows(rows)
    meta = {"synthetic": True, "note": "SYNTHETIC speech (espeak-ng): labels planted in pitch, rate, loudness "
                                       "and words; says nothing about accuracy on real speech",
            "generator": "affectkit make-synthetic spoken", "seed": seed,
            "command": command or f"affectkit make-synthetic spoken {out} --seed {seed}",
            "classes": list(CLASSES), "speakers": {k: v[0] for k, v in SPEAKERS.items()},
            "cues": {k: vars(v) for k, v in CUES.items()}, "sample_rate": SAMPLE_RATE, "dialogues": script}
    (root / "corpus.json").write_text(json.dumps(meta, indent=1))
    return meta
