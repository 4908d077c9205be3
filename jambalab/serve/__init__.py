"""Serving: a continuous-batching engine over a slot cache, with a hybrid prefix-state cache.

    from jambalab.serve.engine import Engine, EngineConfig, SamplingParams

See docs/serving.md.
"""
