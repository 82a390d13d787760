"""gfo: gradient-free optimization of Transformer language models in JAX."""

__version__ = "0.1.0"
