"""Data formats: one module per on-disk format, safe loading, validation, synthetic generators."""
