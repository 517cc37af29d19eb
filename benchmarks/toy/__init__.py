"""The toy reasoning task (multi-step arithmetic, every step checkable) and its tokenizer."""
