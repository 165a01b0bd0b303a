"""Serving: the continuous-batching engine, the tokenizer and chat template, and the OpenAI-compatible HTTP
API (docs/architecture.md#serving)."""
