"""Feature extraction: turn raw inputs (transcripts) into the per-utterance vectors our loaders read."""

from affectkit.features.text import (
    DIM,
    MODEL_NAME,
    MissingExtraError,
    SentenceEncoder,
    build_text_features,
    embed_sentences,
)

__all__ = [
    "DIM",
    "MODEL_NAME",
    "MissingExtraError",
    "SentenceEncoder",
    "build_text_features",
    "embed_sentences",
]
