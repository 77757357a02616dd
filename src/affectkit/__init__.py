"""affectkit: multimodal affect recognition (sentiment and emotion) for research and products."""

__version__ = "0.1.0"
