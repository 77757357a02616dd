"""What an utterance encoder reads for utterance ``i``: the utterance alone, or EmoBERTa-style with its
speaker tag and up to ``context`` PAST utterances (never later ones, so vectors stay valid for the causal
model and the live service).  One function builds it for fine-tuning, offline features and live sessions.

With context the string is ``"A: past1 B: past2 [SEP] A: current"``; the encoder's tokenizer truncates
from the left, so the oldest context goes first when the input is longer than its maximum length.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from affectkit.errors import ConfigError


@dataclass(frozen=True)
class InputRecipe:
    """How utterances become encoder input: ``context`` past turns (0 = none), speaker tags on or off."""

    context: int = 0
    speaker: bool = False
    sep: str = "[SEP]"

    def __post_init__(self) -> None:
        if not isinstance(self.context, int) or self.context < 0:
            raise ConfigError(f"context must be an integer >= 0, got {self.context!r}")

    @property
    def truncation_side(self) -> str:
        """Left when there is context (drop the oldest words), right for a lone utterance."""
        return "left" if self.context > 0 else "right"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> InputRecipe:
        return cls(context=int(raw.get("context", 0)), speaker=bool(raw.get("speaker", False)),
                   sep=str(raw.get("sep", "[SEP]")))


def _turn(speaker: str, sentence: str, tagged: bool) -> str:
    return f"{speaker}: {sentence}" if tagged else sentence


def utterance_input(speakers: Sequence[str], sentences: Sequence[str], i: int, recipe: InputRecipe) -> str:
    """The encoder input of utterance ``i``; reads only ``speakers[:i+1]`` and ``sentences[:i+1]``."""
    if not 0 <= i < len(sentences) or len(speakers) < i + 1:
        raise ConfigError(f"utterance {i} out of range for {len(sentences)} sentences")
    current = _turn(str(speakers[i]), sentences[i], recipe.speaker)
    if recipe.context == 0:
        return current
    start = max(0, i - recipe.context)
    past = [_turn(str(speakers[j]), sentences[j], recipe.speaker) for j in range(start, i)]
    return f"{' '.join(past)} {recipe.sep} {current}" if past else current


def dialogue_inputs(speakers: Sequence[str], sentences: Sequence[str], recipe: InputRecipe) -> list[str]:
    """``utterance_input`` for every utterance of a dialogue, in order."""
    return [utterance_input(speakers, sentences, i, recipe) for i in range(len(sentences))]
