"""One family of errors whose message is a single line a person can act on."""


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
