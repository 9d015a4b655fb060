"""`ConfigError`: the one error of a flag value that cannot be used."""


class ConfigError(ValueError):
    """A flag value that cannot be used; the message names the flag and says how to fix it."""
