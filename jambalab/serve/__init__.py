"""Serving: the engine (continuous batching, prefix-state cache) and the OpenAI-compatible HTTP API."""
