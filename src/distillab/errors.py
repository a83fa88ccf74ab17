"""User-facing errors: each carries one line that names the key or file and what to do."""


class DistillabError(Exception):
    """An error the CLI prints as one line, without a traceback."""


class ConfigError(DistillabError):
    """A config key is unknown, has the wrong type, or is out of range."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"config error: {key}: {message}")


class DataError(DistillabError):
    """A corpus, shard or manifest is missing, malformed or corrupt."""


class CheckpointError(DistillabError):
    """A checkpoint is missing, incomplete or incompatible."""
