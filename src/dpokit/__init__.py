"""dpokit: Direct Preference Optimization (Rafailov et al. 2023) for Hugging Face causal LMs."""

__version__ = "0.1.0"
