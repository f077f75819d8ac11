"""Every exception this package raises on purpose, in one hierarchy.

``UserInputError`` and its subclasses describe bad input (a recipe, a path, a checkpoint, a
layout): the CLI prints them as one line and exits with code 2; ``VerificationError`` (a grown
checkpoint failing a verify threshold) is one line and exit code 4. Other ``MegatronGrowError``
subclasses (``SpawnError``) report failures of the machinery and keep their details.

The process exit codes that say which of these happened are defined here too, once, for the CLI,
the trainer and the launcher (``scripts/slurm/lib.sh`` repeats :data:`EXIT_PREEMPTED` for bash).
"""

EXIT_FAILED = 1
"""Anything else went wrong (a bug, a crashed worker): the traceback says what."""
EXIT_BAD_INPUT = 2
"""Bad input (:class:`UserInputError`): one line names the problem; nothing was written."""
EXIT_PREEMPTED = 3
"""Stopped by SIGTERM/SIGUSR1 after saving a checkpoint: the launcher may requeue the job."""
EXIT_VERIFY_FAILED = 4
"""A grown checkpoint failed a ``verify`` threshold (:class:`VerificationError`)."""
EXIT_INTERRUPTED = 130
"""Stopped by Ctrl-C (128 + SIGINT, what a shell reports): partial output was discarded."""


class MegatronGrowError(Exception):
    """Base class of every error raised on purpose by megatron_grow."""


class UserInputError(MegatronGrowError):
    """Bad input: printed as one line naming the problem, exit code 2."""


class ConfigError(UserInputError, ValueError):
    """A recipe problem; ``str()`` lists every problem, one per line, each naming its key."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = list(problems)
        self.source = source
        head = f"invalid recipe {source}" if source else "invalid recipe"
        super().__init__(head + ":\n" + "\n".join(f"  - {p}" for p in self.problems))


class LayoutError(UserInputError, ValueError):
    """The requested parallel layout does not fit the world size or the model."""


class CheckpointError(UserInputError):
    """A checkpoint is missing, incomplete, unreadable or does not match the architecture."""


class GrowthError(UserInputError):
    """A growth recipe cannot be applied to this source or target."""


class DataError(UserInputError):
    """A data input (text, tokenizer, indexed dataset) is missing or unusable."""


class TrainingError(UserInputError):
    """Training cannot start or go on (bad data inputs, non-finite loss or gradients)."""


class VerificationError(MegatronGrowError):
    """A grown checkpoint failed a ``verify`` threshold (``--max-kl``, ``--min-routing-share``):
    printed as one line, exit code 4 (the input was fine; the result is not acceptable)."""


class SpawnError(MegatronGrowError, RuntimeError):
    """A process started by ``parallel.spawn`` failed; the message carries its traceback."""


class InteropError(UserInputError):
    """A Hugging Face checkpoint cannot be converted (unknown class, unsupported feature, bad files)."""
