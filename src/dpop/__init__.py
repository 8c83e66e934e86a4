"""dpop: preference training for causal language models (DPO, DPO-Positive and their family)."""

__version__ = "0.1.0"
