"""`jambalab info`: layer pattern, parameter counts, KV-cache and SSM-state sizes."""

from __future__ import annotations

import argparse
import json

from jambalab.commands.common import add_model_source, config_from_args
from jambalab.stats import kv_bytes_per_token, param_counts, ssm_state_bytes


def register(sub) -> None:
    p = sub.add_parser("info", help="layer pattern, parameters, cache sizes of a preset or checkpoint")
    add_model_source(p, required=False)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--list", action="store_true", help="list the presets")
    p.set_defaults(func=run)


def info_dict(cfg) -> dict:
    total, active = param_counts(cfg)
    return {
        "name": cfg.name,
        "family": cfg.family,
        "n_layers": cfg.n_layers,
        "layer_types": cfg.layer_types,
        "moe_layers": [i for i in range(cfg.n_layers) if cfg.is_moe(i)],
        "layer_pattern": cfg.layer_pattern(),
        "params_total": total,
        "params_active": active,
        "kv_bytes_per_token": kv_bytes_per_token(cfg, "bf16"),
        "ssm_state_bytes": ssm_state_bytes(cfg, "bf16"),
        "config": cfg.to_dict(),
    }


def run(args: argparse.Namespace) -> int:
    if args.list:
        from jambalab.presets import PRESETS

        for name in PRESETS:
            print(name)
        return 0
    d = info_dict(config_from_args(args))
    if args.json:
        print(json.dumps(d))
        return 0
    kv = d["kv_bytes_per_token"]
    print(f"{d['name']} ({d['family']}), {d['n_layers']} layers: {d['layer_pattern']}")
    print("  (A attention, M Mamba, e = MoE feed-forward)")
    print(f"  parameters: {d['params_total'] / 1e9:.2f}B total, {d['params_active'] / 1e9:.2f}B active per token")
    print(f"  KV cache (bf16): {kv / 1024:.1f} KiB per token, {kv * 262144 / 2**30:.2f} GiB at 256K tokens")
    print(f"  Mamba state (fp32 SSM + bf16 conv): {d['ssm_state_bytes'] / 2**20:.2f} MiB per sequence")
    return 0
