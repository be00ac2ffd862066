"""One exception type for every mistake a user can fix, so entry points print one line instead of a traceback."""


class UserError(Exception):
    """A problem with the user's data, config or files; the message names the culprit and says how to fix it."""


class DataError(UserError, ValueError):
    """The dataset on disk cannot be used as asked (missing root, empty class, mismatched splits...)."""


class ConfigError(UserError, ValueError):
    """A config value is wrong (unknown backbone or weights name, impossible option combination...)."""
