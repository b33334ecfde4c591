"""Errors deltatune raises on bad input. Each names the bad value and what would be valid."""


class DeltatuneError(Exception):
    """Base class: every error deltatune raises on purpose derives from it."""


class ConfigError(DeltatuneError, ValueError):
    """A config holds an unknown method, an unknown option, or a value out of range."""


class TargetError(DeltatuneError, ValueError):
    """A target pattern matches no module, or matches a module the method cannot adapt."""


class CheckpointError(DeltatuneError, ValueError):
    """A saved delta does not fit the model it is loaded onto, or its files are malformed."""


class DataError(DeltatuneError, ValueError):
    """A data file is missing, unreadable, or a record lacks a field its layout needs."""


class ModelLoadError(DeltatuneError):
    """A model could not be resolved or loaded."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM ended a run that has already said what it saved (the message)."""
