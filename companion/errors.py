"""Every error the companion raises on purpose, in one base module that any other module may import.

Each names the bad value and the valid choices in its message. They derive from the built-in type a caller
would catch anyway (``ValueError`` for bad arguments, ``RuntimeError`` for a missing or broken resource), and
all from :class:`CompanionError`, so ``except companion.errors.CompanionError`` catches exactly ours.
"""
from __future__ import annotations


class CompanionError(Exception):
    """Base class of the companion's own errors."""


class AssetError(CompanionError, RuntimeError):
    """A bundled asset is missing, corrupted (sha256 mismatch) or its card is unreadable."""


class ModelError(CompanionError, RuntimeError):
    """A model could not be found, loaded, or used the way it was asked to be used."""


class DeviceError(CompanionError, RuntimeError):
    """The requested device does not exist or cannot run what was asked."""


class DataUnavailable(CompanionError, RuntimeError):
    """A data set needs a download that is not possible here (offline, or the source is unreachable)."""


class CheckpointError(CompanionError, ValueError):
    """A training checkpoint is missing, damaged, or belongs to another recipe or network."""


class SamplerError(CompanionError, ValueError):
    """Unknown sampler name, or an option the sampler does not have."""


class SamplingError(CompanionError, ValueError):
    """Bad arguments to a sampling call, or a run that diverged (non-finite values)."""


class SpeedOptionError(CompanionError, ValueError):
    """A speed option the device or the model cannot use."""


class CachingError(CompanionError, ValueError):
    """A feature cache asked of a model it cannot apply to, or with a bad setting."""


class CacheWarning(UserWarning):
    """A cache entry was unreadable or damaged and is being recomputed."""


class SpeedWarning(UserWarning):
    """A speed option was applied with a caveat (e.g. no speed-up expected on this device)."""
