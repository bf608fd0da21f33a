"""Typed errors for bad input.

Every error a user can cause is a `TinyR1Error`: the CLI prints its message (which names the
file, line or key and the fix) without a traceback. Anything else is a bug and keeps its traceback.
"""


class TinyR1Error(Exception):
    """Base class for errors caused by user input; the message says what is wrong and the fix."""


class ConfigError(TinyR1Error):
    """A preset, TOML file or --set override is invalid."""


class CheckpointError(TinyR1Error):
    """A model/adapter/run folder is missing files or does not match."""


class VideoError(TinyR1Error):
    """A video file is missing, empty or undecodable."""


class DataError(TinyR1Error):
    """A dataset row or file is malformed."""


class RewardError(TinyR1Error):
    """A reward function is unknown, raised, or returned bad values."""


class DeviceError(TinyR1Error):
    """The requested device is unavailable (e.g. a GPU preset on a machine without CUDA)."""


class DiskError(TinyR1Error):
    """A disk is full, read-only or not writable where tinyr1 has to write."""
