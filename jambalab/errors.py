"""The one exception family jambalab raises for bad input.

Every error names what is wrong and where (file, key, field, shape, value), so
the CLI can print it as a single line and exit non-zero.
"""


class JambalabError(Exception):
    """Base class: any error caused by the caller's input or files."""


class ConfigError(JambalabError, ValueError):
    """A config field holds an invalid value, or a preset name is unknown."""


class CheckpointError(JambalabError):
    """A checkpoint directory or file is missing, corrupt, or does not match the model."""


class InputError(JambalabError, ValueError):
    """Bad arguments to a model call: token ids out of range, wrong shapes, bad sampling params."""


class UnsupportedError(JambalabError, NotImplementedError):
    """A valid request this version of jambalab cannot carry out (e.g. a quantization scheme it lacks)."""
