"""One family of errors whose message is a single line a person can act on."""
import os
import re


class DdlmError(Exception):
    """Base error: the CLI prints `ddlm: error: <message>` and exits with status 2. The message
    stays one line even when it quotes input that holds line breaks (they are shown escaped)."""

    def __str__(self) -> str:
        text = super().__str__()
        return text.replace("\r", "\\r").replace("\n", "\\n")


class ConfigError(DdlmError):
    """A configuration value is unknown, of the wrong type, or out of range."""


class DataError(DdlmError):
    """A corpus is missing, empty, not text, or does not fit the tokenizer."""


class CheckpointError(DdlmError):
    """A checkpoint is missing, corrupt, truncated, or of another run."""


class DistributedError(DdlmError):
    """A process of a distributed job lost the others (one died, hung or was killed). Every rank
    that sees it says so, naming itself."""

    every_rank = True


def write_failure(err: BaseException) -> str:
    """Why a write failed, for a person: the system's reason in lower case ('no space left on
    device'), also when a writer wraps it (torch raises its own error in the course of handling
    the OSError; safetensors says '(os error 28)'), else the error's first line."""
    cause: BaseException | None = err
    while cause is not None:
        code = getattr(cause, "errno", None)
        found = re.search(r"os error (\d+)", str(cause)) if code is None else None
        code = int(found.group(1)) if found else code
        if isinstance(code, int) and code > 0:
            return os.strerror(code).lower()
        cause = cause.__cause__ or cause.__context__
    return (str(err).splitlines() or [type(err).__name__])[0][:120]
