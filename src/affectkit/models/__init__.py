"""Models, found by name through the registry (`affectkit.models.registry`).

Importing this package imports every model module, so each ``@register_model`` runs once.
"""

from affectkit.models import corect, mosi_seq, utterance_mlp  # noqa: F401  (register the models)
from affectkit.models.registry import build_model, get_model_entry, model_names, register_model

__all__ = ["build_model", "get_model_entry", "model_names", "register_model"]
