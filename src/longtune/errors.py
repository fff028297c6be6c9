"""Error types the CLI prints as one line: each names the key, file or row at fault and what was expected."""


class LongtuneError(Exception):
    """Base class for errors caused by the user's input, printed without a traceback."""


class ConfigError(LongtuneError):
    """A config key is unknown, has a wrong type or value, or conflicts with another key."""


class DataError(LongtuneError):
    """A dataset file, row or field is missing or malformed."""
