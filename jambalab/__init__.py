"""jambalab: one engine for Jamba-style hybrids (attention + Mamba + MoE), pure Mamba and Transformers."""

from jambalab.cache import HybridCache
from jambalab.config import JambaConfig
from jambalab.errors import CheckpointError, ConfigError, InputError, JambalabError, UnsupportedError
from jambalab.model import JambaLM, ModelOutput

__version__ = "0.1.0"


def from_pretrained(path, dtype=None, quantize: str | None = None, group_size: int | None = None) -> JambaLM:
    """Load a HF-format checkpoint directory (model_type jamba, mamba or falcon_mamba), or a training
    checkpoint / run holding one; quantize: None or a scheme of jambalab.quant (e.g. "int8")."""
    from jambalab.hf import from_pretrained as _load

    return _load(path, dtype=dtype, quantize=quantize, group_size=group_size)


def from_preset(name: str, seed: int | None = 0, **overrides) -> JambaLM:
    """A randomly initialised model of a named preset (config fields may be overridden)."""
    return JambaLM.from_config(JambaConfig.from_preset(name, **overrides), seed=seed)


__all__ = ["JambaConfig", "JambaLM", "HybridCache", "ModelOutput", "from_pretrained", "from_preset",
           "JambalabError", "ConfigError", "CheckpointError", "InputError", "UnsupportedError"]
