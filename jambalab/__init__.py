"""jambalab: one engine for Jamba-style hybrids (attention + Mamba + MoE), pure Mamba and Transformers."""

import os as _os
import sys as _sys

# torch's idle OpenMP workers (libgomp) spin GOMP_SPINCOUNT times before they sleep: 300,000 by default,
# ~5 ms. A decode step run right after anything OpenMP ran (another request's prefill chunk in the
# serving engine) then shared the two cores with a spinning worker: bench peers' B in weight-only bf16
# stepped in a median 20.2 ms there against 15.9 ms 30 ms later. At 10,000 spins (~0.2 ms) both took
# 15.6-15.8 ms, and 512-token prefills stayed even (3 interleaved rounds, bf16 and 4-bit). libgomp reads
# it once, when torch loads it: so it is set only when jambalab is imported before torch (the jambalab
# command is), and never over the user's OMP_WAIT_POLICY or GOMP_SPINCOUNT. SET_ENV is what was set
# here: bench peers takes it out again for llama.cpp, which uses libgomp too and runs as its users run it.
SET_ENV: dict[str, str] = {}
if "torch" not in _sys.modules and not {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT"} & _os.environ.keys():
    SET_ENV["GOMP_SPINCOUNT"] = "10000"
    _os.environ.update(SET_ENV)

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


__all__ = ["SET_ENV", "JambaConfig", "JambaLM", "HybridCache", "ModelOutput", "from_pretrained", "from_preset",
           "JambalabError", "ConfigError", "CheckpointError", "InputError", "UnsupportedError"]
