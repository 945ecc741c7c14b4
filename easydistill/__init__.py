"""easydistill: knowledge distillation for causal language models, driven by one JSON file."""

__version__ = "0.1.0"
