"""The toy reasoning task (multi-step arithmetic, every step checkable) and its tokenizer."""

from pathlib import Path

MODELS = Path(__file__).resolve().parent / "models"  # the shipped toy models: draft, target, prm-small, prm-large
