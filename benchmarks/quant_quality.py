"""Quality of low-precision weights (jambalab.quant): perplexity / bits per byte of a trained small
hybrid, and logit drift on transformers-saved checkpoints, in fp32, bf16, int8 and 4-bit.

    python benchmarks/quant_quality.py                                  # trains cpu-hybrid first (--train-seconds)
    python benchmarks/quant_quality.py --model runs/cpu-hybrid-stdlib --json q.json --plot q.png

Precisions (--precisions): fp32; bf16; int8 per output channel and in groups of 128; 4-bit in
groups of 32, 64 and 128. Each quantized variant is quantized from the model cast to each
--bases dtype, which the matrices that stay float (norms, embedding, router, Mamba's
selection path, a tied lm_head) and the activations keep: bf16 is what a bf16 checkpoint gives,
fp32 what `--int8` on an fp32 checkpoint gives. Each is measured with the activations rounded to int8
blocks (the default, as llama.cpp's Q8_0 / Q4_0 kernels) and, labelled +fa, with float activations
(--activations). The targets (issue 13) compare perplexity to the
bf16 model's: int8 within 1%, 4-bit within 5%.

1. The trained model: perplexity and bits per byte on the held-out split of its training corpus
   (jambalab.evaluate, as `jambalab eval` measures it), the weight bytes, and the logit drift
   against the fp32 model on the first --drift-windows windows of that text.
2. Real-format checkpoints: a JambaForCausalLM (attention, Mamba, MoE) and a FalconMambaForCausalLM,
   randomly initialised by transformers, written with its save_pretrained, read back with
   jambalab.from_pretrained; logit drift of each precision against fp32 on random tokens. Their
   logits are near-uniform (HF's 0.02-std init), so KL and top-1 agreement say little there: the
   trained model's drift is the meaningful one.

Quality figures do not depend on the machine's load; the whole run takes a few minutes beside the training.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without `pip install -e .`

from jambalab.errors import InputError  # noqa: E402
from jambalab.model import JambaLM  # noqa: E402

TARGETS = {"int8": 0.01, "int4": 0.05}  # perplexity increase over bf16 (issue 13)
HF_SHAPES = {  # every quantized matrix's input width (128, 256) is a multiple of 128, so every group size applies
    "jamba": dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, attn_layer_period=4,
                  attn_layer_offset=2, expert_layer_period=2, expert_layer_offset=1, mamba_d_state=16),
    "falcon_mamba": dict(vocab_size=512, hidden_size=128, num_hidden_layers=2, state_size=16,
                         tie_word_embeddings=False),
}


@dataclass(frozen=True)
class Precision:
    """A float dtype for everything, optionally with weight-only quantized matrices."""

    name: str  # e.g. "int4-g32"
    scheme: str | None = None  # None (float), "int8", "int4" or "bf16" (weight-only bf16)
    group_size: int | None = None  # None: per output channel (int8 only)
    activations: str = "int8"  # how quantized products treat activations (jambalab.quant.set_activations)

    @property
    def target(self) -> float | None:
        return TARGETS.get(self.scheme)


FLOATS = {"fp32": torch.float32, "bf16": torch.bfloat16}
PRECISIONS = {p.name: p for p in [Precision("fp32"), Precision("bf16"), Precision("bf16w", "bf16"), Precision("int8", "int8"),
                                  Precision("int8-g128", "int8", 128), Precision("int4-g32", "int4", 32),
                                  Precision("int4-g64", "int4", 64), Precision("int4-g128", "int4", 128)]}


def variants(names: list[str], bases: list[str], acts: tuple[str, ...] = ("int8",)) -> list[tuple[str, Precision, str]]:
    """(label, precision, float dtype name): the float precisions once, each quantized one per base and
    activation mode (labelled "+fa" for float activations)."""
    out = []
    for name in names:
        p = PRECISIONS[name]
        if p.scheme is None:
            out.append((name, p, name))
            continue
        if p.scheme == "bf16":  # weight-only bf16: the float rest in fp32 (over a bf16 base it is the bf16 model)
            out.append((f"{name}/fp32", p, "fp32"))
            continue
        for base in bases:
            for act in acts:
                out.append((f"{name}/{base}" + ("" if act == "int8" else "+fa"), replace(p, activations=act), base))
    return out


def make_variant(model: JambaLM, p: Precision, base: str) -> JambaLM:
    """A copy of the fp32 model cast to base and quantized per p (InputError if a group size does not fit)."""
    from jambalab.quant import quantize_model

    from jambalab.quant import set_activations

    set_activations(p.activations)  # global: in force until the next variant is made
    m = copy.deepcopy(model).to(FLOATS[base]).eval()
    return m if p.scheme is None else quantize_model(m, p.scheme, p.group_size)


# ---------------------------------------------------------------------------------------
# 1. The trained model: perplexity, bits per byte, weight bytes, drift
# ---------------------------------------------------------------------------------------
def measure_lm(model: JambaLM, ids: torch.Tensor, n_bytes: int, todo: list[tuple[str, Precision, str]],
               seq_len: int = 512, drift_windows: int = 4, progress=None) -> list[dict]:
    """One row per variant: perplexity of ids (n,) in windows of seq_len, weight bytes, and logit drift
    against the fp32 model on the first drift_windows windows. A group size that does not divide a
    matrix gives a row with 'skipped' (the reason) instead of numbers."""
    from jambalab.evaluate import perplexity
    from jambalab.quant import logit_drift, weight_bytes

    model = model.float().eval()
    n_windows = max(1, min(drift_windows, ids.numel() // seq_len))
    drift_ids = ids[:n_windows * seq_len].view(n_windows, -1)  # (W, seq_len)
    rows = []
    for label, p, base in todo:
        row = {"precision": label, "float_dtype": base, "scheme": p.scheme, "group_size": p.group_size}
        try:
            m = make_variant(model, p, base)
        except InputError as e:
            rows.append({**row, "skipped": str(e)})
            continue
        if p.scheme == "int8" and p.group_size is None:
            row["group_size"] = "channel"
        row["weight_bytes"] = weight_bytes(m)
        row.update(perplexity(m, ids, n_bytes, seq_len=seq_len))
        row["drift_vs_fp32"] = None if label == "fp32" else logit_drift(model, m, drift_ids)
        rows.append(row)
        if progress is not None:
            progress(row)
    _compare_to_bf16(rows)
    return rows


def _compare_to_bf16(rows: list[dict]) -> None:
    """Adds ppl_vs_bf16 (relative increase) and, for quantized rows, the target and whether it is met."""
    bf16 = next((r for r in rows if r["precision"] == "bf16" and "ppl" in r), None)
    for r in rows:
        if bf16 is None or "ppl" not in r:
            continue
        r["ppl_vs_bf16"] = r["ppl"] / bf16["ppl"] - 1
        target = TARGETS.get(r["scheme"])
        if target is not None:
            r["target"], r["meets_target"] = target, r["ppl_vs_bf16"] <= target


# ---------------------------------------------------------------------------------------
# 2. Real-format checkpoints: logit drift
# ---------------------------------------------------------------------------------------
def hf_checkpoint(family: str, path: Path, seed: int = 0) -> Path:
    """A randomly initialised transformers model of HF_SHAPES[family], saved with save_pretrained (fp32)."""
    import transformers as tf

    cls = {"jamba": (tf.JambaConfig, tf.JambaForCausalLM),
           "falcon_mamba": (tf.FalconMambaConfig, tf.FalconMambaForCausalLM)}[family]
    torch.manual_seed(seed)
    cls[1](cls[0](**HF_SHAPES[family])).save_pretrained(path)
    return path


def measure_checkpoints(todo: list[tuple[str, Precision, str]], workdir: Path, length: int = 256, batch: int = 2,
                        seed: int = 0, progress=None) -> list[dict]:
    """Per family: weight bytes and logit drift against fp32 of each variant of the checkpoint as
    jambalab.from_pretrained reads it, on (batch, length) random tokens."""
    import jambalab
    from jambalab.quant import logit_drift, weight_bytes

    out = []
    for family in HF_SHAPES:
        path = hf_checkpoint(family, workdir / family, seed)
        ref = jambalab.from_pretrained(path, dtype=torch.float32).eval()
        ids = torch.randint(0, ref.config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))
        rows = []
        for label, p, base in todo:
            if label == "fp32":
                continue
            try:
                m = make_variant(ref, p, base)
            except InputError as e:
                rows.append({"precision": label, "skipped": str(e)})
                continue
            rows.append({"precision": label, "weight_bytes": weight_bytes(m), **logit_drift(ref, m, ids)})
            if progress is not None:
                progress(rows[-1])
        out.append({"family": family, "architecture": ref.config.layer_pattern(), "params": ref.num_parameters(),
                    "fp32_weight_bytes": weight_bytes(ref), "tokens": batch * length, "rows": rows})
    return out


# ---------------------------------------------------------------------------------------
# The model, the report
# ---------------------------------------------------------------------------------------
def trained_model_dir(args: argparse.Namespace) -> Path:
    """--model, or the run in --train-out (trained now with `jambalab train` unless it has a checkpoint)."""
    from jambalab.train.checkpoint import latest_checkpoint

    if args.model:
        return Path(args.model)
    out = Path(args.train_out)
    if latest_checkpoint(out / "checkpoints") is None:
        cmd = [sys.executable, "-m", "jambalab", "train", "--time-budget", str(args.train_seconds), "--out", str(out)]
        print("training: " + " ".join(cmd[1:]), file=sys.stderr, flush=True)
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=str(ROOT))
        subprocess.run(cmd, check=True, env=env, stdout=sys.stderr)
    return out


def _pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:+.2f}%"


def format_lm(rows: list[dict]) -> list[str]:
    lines = [f"{'precision':<16}{'weights MiB':>12}{'bits/byte':>11}{'ppl':>9}{'vs bf16':>9}{'target':>8}"
             f"{'rel L2':>10}{'KL vs fp32':>12}{'top-1 agree':>13}"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"{r['precision']:<16}skipped: {r['skipped']}")
            continue
        d = r["drift_vs_fp32"] or {}
        met = "" if "target" not in r else ("<=" if r["meets_target"] else "MISS ") + f"{100 * r['target']:.0f}%"
        bpb = r.get("bits_per_byte", float("nan"))
        lines.append(f"{r['precision']:<16}{r['weight_bytes'] / 2**20:>12.3f}{bpb:>11.4f}"
                     f"{r['ppl']:>9.4f}{_pct(r.get('ppl_vs_bf16')):>9}{met:>8}"
                     f"{d.get('rel_l2', 0.0):>10.2e}{d.get('kl', 0.0):>12.2e}{d.get('top1_agree', 1.0):>13.4f}")
    return lines


def format_checkpoints(ckpts: list[dict]) -> list[str]:
    lines = []
    for c in ckpts:
        lines.append(f"{c['family']} ({c['architecture']}, {c['params']:,} parameters, "
                     f"fp32 {c['fp32_weight_bytes'] / 2**20:.2f} MiB; {c['tokens']} random tokens)")
        lines.append(f"  {'precision':<16}{'weights MiB':>12}{'rel L2':>10}{'max |d|':>10}{'KL':>11}"
                     f"{'top-1 agree':>13}")
        for r in c["rows"]:
            if "skipped" in r:
                lines.append(f"  {r['precision']:<16}skipped: {r['skipped']}")
                continue
            lines.append(f"  {r['precision']:<16}{r['weight_bytes'] / 2**20:>12.3f}{r['rel_l2']:>10.2e}"
                         f"{r['max_abs']:>10.2e}{r['kl']:>11.2e}{r['top1_agree']:>13.4f}")
    return lines


def plot(result: dict, path: Path) -> None:
    """Bits per byte per precision (with the bf16 + 1% / + 5% perplexity lines) and KL against fp32."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["lm"] if "ppl" in r]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
    labels = [r["precision"] for r in rows]
    bpb = [r["bits_per_byte"] for r in rows]
    colors = [{None: "tab:gray", "bf16": "tab:green", "int8": "tab:blue", "int4": "tab:orange"}[r["scheme"]] for r in rows]
    ax.bar(labels, bpb, color=colors)
    lo, hi = min(bpb), max(bpb)
    bf16 = next((r for r in rows if r["precision"] == "bf16"), None)
    if bf16 is not None:  # ppl x (1 + t) is val_loss + ln(1 + t) nats a token
        for t, style in ((0.01, ":"), (0.05, "--")):
            y = bf16["bits_per_byte"] * (bf16["val_loss"] + math.log1p(t)) / bf16["val_loss"]
            ax.axhline(y, color="black", linestyle=style, linewidth=1, label=f"bf16 perplexity +{t:.0%}")
            hi = max(hi, y)
        ax.legend(fontsize=8, loc="upper left")
        for i, r in enumerate(rows):
            ax.text(i, r["bits_per_byte"], _pct(r["ppl_vs_bf16"]), ha="center", va="bottom", fontsize=6, rotation=90)
    ax.set_ylim(lo - 0.5 * (hi - lo + 1e-3), hi + 0.25 * (hi - lo + 1e-3))
    ax.set_ylabel("bits per byte (held-out text)")
    ax.set_title(f"{result['model']}", fontsize=8)
    ax.tick_params(axis="x", rotation=45, labelsize=8)
    series = [("trained model", rows)] + [(c["family"] + " (random)", c["rows"]) for c in result.get("checkpoints", [])]
    for name, rs in series:
        rs = [r for r in rs if "skipped" not in r and (r.get("drift_vs_fp32") or "kl" in r)]
        ax2.plot([r["precision"] for r in rs], [max((r.get("drift_vs_fp32") or r)["kl"], 1e-12) for r in rs],
                 marker="o", label=name)
    ax2.set_yscale("log")
    ax2.set_ylabel("KL(fp32 || precision), nats per token")
    ax2.set_title("logit drift against fp32", fontsize=9)
    ax2.tick_params(axis="x", rotation=45, labelsize=8)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="a checkpoint directory or `jambalab train` run (default: train one)")
    ap.add_argument("--train-out", default="runs/quant-quality", help="where the default model is trained")
    ap.add_argument("--train-seconds", type=float, default=390.0, help="training time of the default model")
    ap.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=list(PRECISIONS))
    ap.add_argument("--bases", nargs="+", default=["bf16", "fp32"], choices=list(FLOATS),
                    help="float dtype(s) the quantized variants keep for the rest (default: both)")
    ap.add_argument("--activations", nargs="+", default=["int8", "float"], choices=["int8", "float"],
                    help="activation modes of the quantized variants (default both; float ones are labelled +fa)")
    ap.add_argument("--data", help="perplexity text: a file, or a corpus' held-out split (default: stdlib)")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=65536)
    ap.add_argument("--drift-windows", type=int, default=4, help="windows of --seq-len for the trained model's drift")
    ap.add_argument("--no-checkpoints", action="store_true", help="skip part 2 (needs transformers)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (quality does not depend on them)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="write the results to this file")
    ap.add_argument("--plot", type=Path, default=Path("quant_quality.png"), help="PNG (default quant_quality.png)")
    args = ap.parse_args()
    if args.seq_len < 2 or args.max_tokens < 2 or args.threads < 1 or args.drift_windows < 1:
        ap.error("--seq-len and --max-tokens must be >= 2, --threads and --drift-windows >= 1")
    torch.set_num_threads(args.threads)

    from tqdm import tqdm

    from jambalab import evaluate as ev

    model, tok, source = ev.load_for_eval(trained_model_dir(args), seed=args.seed)
    ids, n_bytes, what = ev.corpus_eval_text(tok, args.data, seed=args.seed, max_tokens=args.max_tokens)
    todo = variants(args.precisions, args.bases, tuple(args.activations))
    bar = tqdm(total=len(todo) * (1 if args.no_checkpoints else 1 + len(HF_SHAPES)), desc="variants", unit="model")
    result = {"model": source, "text": what, "seq_len": args.seq_len, "params": model.num_parameters(),
              "layer_pattern": model.config.layer_pattern(), "targets_vs_bf16": TARGETS,
              "lm": measure_lm(model, ids, n_bytes, todo, args.seq_len, args.drift_windows, lambda r: bar.update())}
    if not args.no_checkpoints:
        with tempfile.TemporaryDirectory() as tmp:
            result["checkpoints"] = measure_checkpoints(todo, Path(tmp), seed=args.seed,
                                                        progress=lambda r: bar.update())
    bar.close()
    print(f"model: {source} ({result['layer_pattern']}, {result['params']:,} parameters)\ntext: {what}, "
          f"windows of {args.seq_len}\n")
    print("\n".join(format_lm(result["lm"])))
    if "checkpoints" in result:
        print("\nlogit drift against fp32, transformers-saved checkpoints read by jambalab.from_pretrained:")
        print("\n".join(format_checkpoints(result["checkpoints"])))
    plot(result, args.plot)
    print(f"\nplot: {args.plot}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
        print(f"json: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
