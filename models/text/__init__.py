"""Text in and out: prompts to tokens (with their limits), chat templates, tokens to text, stop strings."""
