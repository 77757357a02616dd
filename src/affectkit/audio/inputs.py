"""What a checkpoint reads from an utterance of speech: its transcript (embedded like typed text) when the
model reads text, its 88 eGeMAPS numbers when the model's audio modality is 88-d (trained on ``affectkit
features audio``).  Any other audio size, or video, cannot be fed from a microphone: refused up front."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from affectkit.audio.frontend import Utterance
from affectkit.audio.prosody import DIM, Standardiser
from affectkit.errors import ConfigError

__all__ = ["AudioPlan", "plan_inputs"]


@dataclass(frozen=True)
class AudioPlan:
    """``text``: the model reads the transcript; ``prosody``: it reads the eGeMAPS vector as its audio
    modality (otherwise prosody is only logged)."""

    text: bool
    prosody: bool
    standardise: Standardiser | None = None

    def inputs(self, utt: Utterance) -> tuple[str | None, dict[str, np.ndarray]]:
        """(transcript for the text encoder or None, feature vectors by modality)."""
        feats: dict[str, np.ndarray] = {}
        if self.prosody:
            v = np.asarray(utt.prosody, dtype=np.float32)
            feats["audio"] = self.standardise(v) if self.standardise is not None else v
        return (utt.text if self.text else None), feats

    def classifiable(self, utt: Utterance) -> bool:
        """A text model needs words: an utterance transcribed as nothing (a cough) is logged, not classified."""
        return not self.text or bool(utt.text.strip())


def plan_inputs(modalities: Sequence[str], dims: Mapping[str, int], can_embed_text: bool,
                audio_features: object = None) -> AudioPlan:
    """The plan for a model reading ``modalities`` with ``dims`` (``audio_features``: the checkpoint's
    ``info["audio_features"]``, the standardiser of its training features); ConfigError (one line) if
    speech cannot feed it."""
    if "visual" in modalities:
        raise ConfigError("this checkpoint reads video features, which speech cannot give")
    if "audio" in modalities and int(dims["audio"]) != DIM:
        raise ConfigError(f"this checkpoint's audio features are {dims['audio']}-d, not the {DIM} eGeMAPS numbers "
                          "of the audio front end: train on `affectkit features audio` output to use prosody")
    if "text" in modalities and not can_embed_text:
        raise ConfigError("this checkpoint's text features are not the sentence encoder's, so transcripts "
                          "cannot be embedded for it")
    return AudioPlan(text="text" in modalities, prosody="audio" in modalities,
                     standardise=Standardiser.from_meta(audio_features) if "audio" in modalities else None)
