"""Checkpoints hold the run config, the data info and the state dict: plain data that loads with
``torch.load(..., weights_only=True)`` and rebuilds the model from the file alone (no pickled modules)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from affectkit import __version__
from affectkit.config import RunConfig, config_from_dict
from affectkit.errors import DataError

FORMAT = 1


def save_checkpoint(path: str | Path, cfg: RunConfig, info: dict[str, Any], model: nn.Module,
                    extra: dict[str, Any] | None = None) -> None:
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    mcfg = getattr(model, "cfg", None)
    # every field of the model's config, so that defaults changed later never apply to these weights
    full = dataclasses.asdict(mcfg) if dataclasses.is_dataclass(mcfg) and not isinstance(mcfg, type) else None
    torch.save(
        {
            "affectkit_checkpoint": FORMAT,
            "version": __version__,
            "config": cfg.to_dict(),
            "model_config": full,
            "info": info,
            "state_dict": state,
            "extra": extra or {},
        },
        Path(path),
    )


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint dict, loaded with ``weights_only=True`` (no code runs)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a corrupt or foreign file
        raise DataError(f"{path}: not a loadable checkpoint ({type(exc).__name__})") from None
    if not isinstance(ckpt, dict) or ckpt.get("affectkit_checkpoint") != FORMAT:
        raise DataError(f"{path}: not an affectkit checkpoint (format {FORMAT})")
    return ckpt


def load_model(path: str | Path, device: torch.device | str = "cpu") -> tuple[nn.Module, RunConfig, dict[str, Any]]:
    """Rebuild the model from a checkpoint alone, on ``device``: (model in eval mode, run config, data info).

    Checkpoints hold CPU tensors whatever device trained them, so any checkpoint loads on any device."""
    from affectkit.models import build_model
    from affectkit.models.registry import legacy_defaults

    ckpt = read_checkpoint(path)
    cfg = config_from_dict(ckpt["config"])
    if ckpt.get("model_config") is None:  # written before checkpoints held every field: older defaults
        cfg.model.update({k: v for k, v in legacy_defaults(cfg.model_name).items() if k not in cfg.model})
    model = build_model(cfg.model_name, ckpt.get("model_config") or cfg.model_params, ckpt["info"])
    model.load_state_dict(ckpt["state_dict"])
    model.to(device)
    model.eval()
    return model, cfg, ckpt["info"]
