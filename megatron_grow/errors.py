"""Exception types for bad input: the CLI prints them as one line and exits non-zero."""


class MegatronGrowError(Exception):
    """Base class for user-facing errors (bad checkpoint, bad recipe combination, ...)."""


class CheckpointError(MegatronGrowError):
    """A checkpoint is missing, incomplete, unreadable or does not match the architecture."""


class GrowthError(MegatronGrowError):
    """A growth recipe cannot be applied to this source or target."""


class InteropError(MegatronGrowError):
    """A Hugging Face checkpoint cannot be converted (unknown class, unsupported feature, bad files)."""
