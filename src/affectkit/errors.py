"""Exceptions with one-line, user-facing messages (the CLI prints them without a traceback)."""


class AffectkitError(Exception):
    """Base class for errors the CLI reports as a single line."""


class DataError(AffectkitError, ValueError):
    """A data file is missing, malformed or holds values we refuse to train on."""


class ConfigError(AffectkitError, ValueError):
    """A configuration key, value or model name is not valid."""
