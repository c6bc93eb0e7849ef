"""One family of errors whose message is a single line a person can act on."""


class DdlmError(Exception):
    """Base error: the CLI prints `ddlm: error: <message>` and exits with status 2."""


class ConfigError(DdlmError):
    """A configuration value is unknown, of the wrong type, or out of range."""


class DataError(DdlmError):
    """A corpus is missing, empty, not text, or does not fit the tokenizer."""


class CheckpointError(DdlmError):
    """A checkpoint is missing, corrupt, truncated, or of another run."""
