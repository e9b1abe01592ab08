"""vanishlab: sweeps of MNIST classifiers that show why deep networks fail to train."""


class ConfigError(ValueError):
    """A bad setting, reported as one paragraph (key, value, fix) before any training starts."""
