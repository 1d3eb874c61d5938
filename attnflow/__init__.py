"""attnflow: how attention flows through vision-language transformers, and the faster
models it suggests. probes -> analyses -> reducers -> reports."""

__version__ = "0.1.0"
