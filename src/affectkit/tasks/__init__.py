"""Tasks tell the one trainer how to load a data format, batch it, score outputs and compute metrics."""

from __future__ import annotations

from affectkit.errors import ConfigError
from affectkit.tasks.base import Task


def get_task(name: str) -> Task:
    """The task object for ``data.task``; imports lazily so a MOSI run never imports graph code."""
    if name == "mosi":
        from affectkit.tasks.mosi import MosiTask

        return MosiTask()
    if name == "conversation":
        from affectkit.tasks.conversation import ConversationTask

        return ConversationTask()
    raise ConfigError(f"unknown data.task {name!r}; valid: mosi, conversation")


__all__ = ["Task", "get_task"]
