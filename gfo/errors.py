"""The user-error type every config-reading module raises (its own module: `gfo.optim.registry` and
`gfo.run.config` both need it, and neither may import the other back)."""


class ConfigError(ValueError):
    """A configuration key, type or value that cannot be used."""
