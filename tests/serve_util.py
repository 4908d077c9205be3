"""Shared by the serving-engine tests: engines that are always stopped."""

from contextlib import contextmanager

from jambalab.serve.engine import Engine, EngineConfig

TIMEOUT = 60  # seconds: every blocking wait in the serving tests is bounded


@contextmanager
def stopped_after(**defaults):
    """Yields make(model, **cfg) -> Engine (cfg over `defaults`); every engine it made is stopped on
    exit, even when the test failed."""
    made = []

    def make(model, **cfg):
        made.append(Engine(model, EngineConfig(**{**defaults, **cfg})))
        return made[-1]

    try:
        yield make
    finally:
        for e in made:
            e.stop(drain=False, timeout=TIMEOUT)
