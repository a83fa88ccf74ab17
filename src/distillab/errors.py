"""User-facing errors: each carries one line that names the key or file and what to do."""


class DistillabError(Exception):
    """An error the CLI prints as one line, without a traceback."""


class ConfigError(DistillabError, ValueError):
    """A config key is unknown, has the wrong type, or is out of range."""

    def __init__(self, key: str, message: str):
        self.key, self.detail = key, message
        super().__init__(f"config error: {key}: {message}")

    def within(self, prefix: str) -> "ConfigError":
        """The same error with its key inside the section `prefix` (unchanged for an empty prefix)."""
        return ConfigError(f"{prefix}.{self.key}" if prefix else self.key, self.detail)


def require(ok: bool, key: str, message: str) -> None:
    """Raise ConfigError(key, message) unless `ok`."""
    if not ok:
        raise ConfigError(key, message)


class DataError(DistillabError):
    """A corpus, shard or manifest is missing, malformed or corrupt."""


class CheckpointError(DistillabError):
    """A checkpoint is missing, incomplete or incompatible."""


class StorageError(DistillabError):
    """A write its place refused: a full disk, a read-only filesystem, no permission (the message
    names the place and what to do; nothing partial is left behind)."""
