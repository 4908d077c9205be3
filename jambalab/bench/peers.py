"""`jambalab bench peers`: jambalab against llama.cpp on the same transformers-saved checkpoints.

Legend: d d_model, D d_inner, N d_state, R dt_rank, V vocab, E experts, K experts per token.

    1. checkpoints  A: Falcon-Mamba-7B-shaped (d 4096, D 8192, N 16, R 256, V 65024), cut to a few
                    layers (default 6: 1.16B parameters); B: a Jamba-shaped hybrid (d 1024, 8 layers,
                    attention at layer 4, E 16 / K 2 on odd layers). Random weights, written by
                    transformers' own classes (bf16 safetensors) with a small sentencepiece
                    tokenizer.model; cached under --work, so a rerun skips steps 1 and 2.
    2. GGUF         llama.cpp's convert_hf_to_gguf.py to F32 and BF16, llama-quantize to Q8_0, Q4_0, Q4_K_M.
    3. llama.cpp    llama-bench -t 2 -p 512 -n 64 -r 1 -o json, per file and round.
    4. jambalab     the same work: prefill 512 tokens (one forward, the last token's logits) and decode
                    64 tokens from an empty context (like llama-bench's pp512 and tg64), one timed run
                    after one warm-up per round, for fp32, bf16 (a bf16 model), bf16w (weight-only bf16), int8
                    and int4 via jambalab.from_pretrained(path, dtype=..., quantize=...).
                    3 rounds (--repeat), each measuring every pair in both engines back to back.
    5. bound        decode as % of the bandwidth bound: weight bytes one token reads x tokens/s / this
                    machine's read bandwidth (machine.read_bandwidth_gbs, in its own process).
    6. parity       (when llama-cpp-python's ctypes bindings sit beside the llama.cpp source, as in its
                    sdist) jambalab's and llama.cpp's greedy continuations of the same token ids, fp32.

Each measurement runs in a fresh process (`python -m jambalab.bench.peers <what> <json>`), so one
engine's memory and threads cannot disturb the next. Figures are tokens/s, the best of the timed runs
(the least disturbed on a shared machine), with the spread (max - min) / max beside them.
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
import textwrap
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from jambalab.bench.llamacpp import LlamaCpp, find_llama_cpp, gguf_bytes_per_token, gguf_file, llama_bench
from jambalab.bench.machine import best_of
from jambalab.errors import InputError

# (jambalab precision, llama.cpp file type) pairs, one table row each.
PAIRS = [("fp32", "F32"), ("bf16", "BF16"), ("bf16w", "BF16"), ("int8", "Q8_0"), ("int4", "Q4_0"),
         ("int4", "Q4_K_M")]
# jambalab precision -> from_pretrained(dtype=..., quantize=...). bf16 is a bf16 model (bf16 activations and
# states, HF's layout); bf16w is weight-only bf16 (`--bf16-weights`: bf16 matrices, float32 rest and
# activations), llama.cpp's BF16 layout. Quantized models keep their float parts and activations in float32
# too (from_pretrained's default with quantize=), as llama.cpp's Q8_0 / Q4_0 do.
PRECISIONS = {"fp32": ("float32", None), "bf16": ("bfloat16", None), "bf16w": ("float32", "bf16"),
              "int8": ("float32", "int8"), "int4": ("float32", "int4")}


# =======================================================================================
# The two checkpoints
# =======================================================================================
@dataclass
class Shape:
    key: str  # "A" or "B": the table's column group
    name: str  # directory name under --work
    hf: dict  # config.json fields for transformers' config class of model_type

    @property
    def model_type(self) -> str:
        return self.hf["model_type"]


def falcon_mamba_shape(layers: int = 6, quick: bool = False) -> Shape:
    """Falcon-Mamba-7B's matrices (tiiuae/falcon-mamba-7b) with `layers` of its 64 layers."""
    if quick:
        dims = dict(hidden_size=128, state_size=16, time_step_rank=32, vocab_size=1024)
    else:
        dims = dict(hidden_size=4096, state_size=16, time_step_rank=256, vocab_size=65024)
    # expand 2: transformers derives d_inner from it (the real config's expand 16 is not what its weights hold)
    hf = dict(model_type="falcon_mamba", num_hidden_layers=layers, expand=2, conv_kernel=4, use_bias=False,
              use_conv_bias=True, residual_in_fp32=True, tie_word_embeddings=False, layer_norm_epsilon=1e-5,
              mixer_rms_eps=1e-6, bos_token_id=0, eos_token_id=11, pad_token_id=11, **dims)
    return Shape("A", f"falcon-mamba-7b-{layers}l" + ("-quick" if quick else ""), hf)


def jamba_shape(quick: bool = False) -> Shape:
    """A Jamba-block hybrid at d_model 1024: 8 layers, attention at 4 (1:7), 16 experts top-2 on odd layers."""
    if quick:
        dims = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
                    num_experts=4, vocab_size=1024)
    else:
        dims = dict(hidden_size=1024, intermediate_size=3328, num_attention_heads=16, num_key_value_heads=8,
                    num_experts=16, vocab_size=65536)
    hf = dict(model_type="jamba", num_hidden_layers=8, attn_layer_period=8, attn_layer_offset=4,
              expert_layer_period=2, expert_layer_offset=1, num_experts_per_tok=2, mamba_d_state=16,
              mamba_d_conv=4, mamba_expand=2, mamba_dt_rank="auto", tie_word_embeddings=False,
              max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, pad_token_id=0, **dims)
    return Shape("B", "jamba-1024d-8l" + ("-quick" if quick else ""), hf)


def build_checkpoint(shape: Shape, out: Path, seed: int = 0, max_shard_size: str = "5GB") -> Path:
    """Random weights saved by transformers' own class for shape.model_type (bf16 safetensors).

    Reuses `out` if it already holds this shape (peers.json records it); writes atomically."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = {"hf": shape.hf, "seed": seed, "max_shard_size": max_shard_size}
    marker = out / "peers.json"
    if marker.is_file() and json.loads(marker.read_text()) == spec:
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    fields = {k: v for k, v in shape.hf.items() if k != "model_type"}
    config = AutoConfig.for_model(shape.model_type, **fields)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(tmp, max_shard_size=max_shard_size)
    del model
    (tmp / "peers.json").write_text(json.dumps(spec, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


# =======================================================================================
# jambalab: one precision of one checkpoint, in a fresh process
# =======================================================================================
def load_precision(path: str | Path, precision: str):
    """A checkpoint loaded in one of PRECISIONS, in eval mode (what every jambalab measurement here runs)."""
    import jambalab

    dtype, quantize = PRECISIONS[precision]
    kwargs = {"quantize": quantize} if quantize else {}
    return jambalab.from_pretrained(path, dtype=dtype, **kwargs).eval()


def greedy_decode_rate(model, first, n: int) -> float:
    """tokens/s of n greedy tokens from `first` (1, 1) in a fresh cache, the first one included, as
    llama-bench's tg decodes from an empty context. Call it under torch.inference_mode()."""
    cache = model.allocate_cache(1, max_length=n)
    tok = first
    t0 = time.perf_counter()
    for _ in range(n):
        tok = model(tok, cache=cache).logits[:, -1].argmax(-1, keepdim=True)  # (1, 1) greedy
    return n / (time.perf_counter() - t0)


def measure_jambalab(spec: dict) -> dict:
    """Child side: load, then time prefill (prompt tokens, one call) and decode (gen tokens from an
    empty context), `repeat` runs each after a warm-up. A precision this jambalab cannot load
    (TypeError for an unknown keyword, NotImplementedError / UnsupportedError) is reported, not raised."""
    import torch

    torch.set_num_threads(spec["threads"])
    try:
        model = load_precision(spec["path"], spec["precision"])
    except (TypeError, NotImplementedError) as e:
        return {"unsupported": f"{type(e).__name__}: {e}"}
    cfg = model.config
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, cfg.vocab_size, (1, spec["prompt"]), generator=gen)  # (1, L)
    first = prompt[:, :1]  # (1, 1): decode starts from one token in an empty cache, as llama-bench's tg does

    def prefill() -> float:
        cache = model.allocate_cache(1, max_length=prompt.shape[1])
        t0 = time.perf_counter()
        model(prompt, cache=cache, logits_to_keep=1)
        return prompt.shape[1] / (time.perf_counter() - t0)

    with torch.inference_mode():
        prefill()
        pre = [prefill() for _ in range(spec["repeat"])]
        greedy_decode_rate(model, first, min(8, spec["gen"]))
        dec = [greedy_decode_rate(model, first, spec["gen"]) for _ in range(spec["repeat"])]
    return {"prefill": best_of(pre), "decode": best_of(dec), "bytes_per_token": model_bytes_per_token(model)}


def count_params(model_dir: Path) -> int:
    """Parameters of a checkpoint, counted on the meta device (no weights read)."""
    from jambalab.hf import load_config
    from jambalab.model import JambaLM

    return sum(p.numel() for p in JambaLM.on_meta(load_config(model_dir)).parameters())


def model_bytes_per_token(model) -> int:
    """Bytes of weights (parameters and buffers, whatever their dtype or packing) one decode token
    reads: all of them, except one row of an untied embedding and K/E of each MoE layer's experts."""
    cfg = model.config

    def nbytes(module) -> int:
        seen = {t.data_ptr(): t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()]}
        return sum(seen.values())

    total = float(nbytes(model))
    if not cfg.tie_embeddings:
        emb = nbytes(model.embed)
        total -= emb - emb / cfg.vocab_size
    for i, layer in enumerate(model.layers):
        if cfg.is_moe(i) and layer.ffn is not None:
            experts = nbytes(layer.ffn) - nbytes(layer.ffn.router)
            total -= experts * (1 - cfg.top_k / cfg.n_experts)
    return int(total)


def measure_bandwidth(spec: dict) -> dict:
    """Child side: this machine's read bandwidth at `threads` threads (best of 5 sums of `mib` MiB)."""
    import torch

    from jambalab.bench import machine

    torch.set_num_threads(spec["threads"])
    return {"read_gbs": machine.read_bandwidth_gbs(spec["mib"], repeat=5)}


CHILDREN = {"jambalab": measure_jambalab, "bandwidth": measure_bandwidth}


def run_child(what: str, spec: dict, timeout_s: int) -> dict:
    """One CHILDREN[what](spec) in a fresh interpreter; {'error': ...} on failure."""
    from jambalab.bench.probe import run_module_json

    return run_module_json("jambalab.bench.peers", [what, json.dumps(spec)], timeout_s,
                           {"OMP_NUM_THREADS": str(spec.get("threads", 2))})


# =======================================================================================
# The run
# =======================================================================================
@dataclass
class Plan:
    a_layers: int = 6
    prompt: int = 512
    gen: int = 64
    repeat: int = 3
    threads: int = 2
    quick: bool = False
    models: tuple[str, ...] = ("A", "B")
    precisions: tuple[str, ...] = tuple(PRECISIONS)
    bandwidth_mib: int = 1024
    timeout_s: int = 3600
    parity_tokens: int = 32

    def shapes(self) -> list[Shape]:
        every = [falcon_mamba_shape(self.a_layers, self.quick), jamba_shape(self.quick)]
        return [s for s in every if s.key in self.models]

    def gguf_types(self) -> list[str]:
        return list(dict.fromkeys(g for p, g in PAIRS if p in self.precisions))  # BF16 once for bf16 and bf16w


QUICK = Plan(a_layers=2, prompt=32, gen=8, repeat=1, quick=True, bandwidth_mib=64, timeout_s=600, parity_tokens=8)


@dataclass
class Results:
    plan: dict
    machine: dict = field(default_factory=dict)
    models: dict = field(default_factory=dict)  # key -> {"name", "path", "params", "hf"}
    jambalab: dict = field(default_factory=dict)  # key -> precision -> measurement
    llama_cpp: dict = field(default_factory=dict)  # key -> gguf type -> measurement
    parity: dict = field(default_factory=dict)  # key -> {"tokens_equal", ...}
    notes: list[str] = field(default_factory=list)


def run(plan: Plan, work: Path, llama: LlamaCpp | None, progress: bool = True) -> dict:
    from tqdm import tqdm

    from jambalab.bench import machine

    shapes = plan.shapes()
    n_gguf = len(plan.gguf_types()) if llama else 0
    total = 1 + len(shapes) * (1 + n_gguf + plan.repeat * (len(plan.precisions) + n_gguf) + (1 if llama else 0))
    res = Results(plan=asdict(plan), machine=machine.machine_info())
    res.machine["threads"] = plan.threads
    if llama is None:
        res.notes.append("llama.cpp: skipped (no --llama-bench / --llama-cpp-dir given); jambalab figures only. "
                         "Build recipe: docs/precision.md, 'Measuring against llama.cpp'")
    with tqdm(total=total, desc="bench peers", unit="step", disable=not progress) as bar:
        def step(label: str) -> None:
            bar.set_postfix_str(label)

        step("read bandwidth")
        bw = run_child("bandwidth", {"threads": plan.threads, "mib": plan.bandwidth_mib}, plan.timeout_s)
        res.machine["read_gbs"] = bw.get("read_gbs")
        bar.update(1)
        for shape in shapes:
            _one_model(plan, work, llama, shape, res, step, bar)
    res.machine["load_1min_end"] = machine.load_average()
    return asdict(res)


def _one_model(plan: Plan, work: Path, llama: LlamaCpp | None, shape: Shape, res: Results, step, bar) -> None:
    """One model: checkpoint, GGUF files, then `repeat` rounds, each measuring every precision pair once in
    both engines, one right after the other (jambalab's precision, then its llama.cpp files). Interleaved
    rounds, not all of one engine then all of the other: this VM's speed moves by up to ~1.5x over
    minutes, and each engine keeps the best of its rounds, so both get the same chances."""
    step(f"{shape.key}: checkpoint")
    path = build_checkpoint(shape, work / shape.name)
    bar.update(1)
    hf = shape.hf
    top_k, n_experts = hf.get("num_experts_per_tok", 1), hf.get("num_experts", 1)
    res.models[shape.key] = {"name": shape.name, "path": str(path), "hf": hf, "params": count_params(path)}
    ggufs: dict[str, Path | None] = {}
    if llama:
        res.llama_cpp[shape.key] = {}
    for kind in plan.gguf_types() if llama else []:
        step(f"{shape.key}: GGUF {kind}")
        try:
            ggufs[kind] = gguf_file(llama, path, work / "gguf", kind, plan.threads, plan.timeout_s)
        except RuntimeError as e:
            ggufs[kind] = None
            res.llama_cpp[shape.key][kind] = {"error": str(e)}
        bar.update(1)
    ours: dict[str, list[dict]] = {p: [] for p in plan.precisions}
    theirs: dict[str, list[dict]] = {k: [] for k, f in ggufs.items() if f is not None}
    for rnd in range(plan.repeat):
        done: set[str] = set()
        for precision in plan.precisions:
            step(f"{shape.key}: round {rnd + 1}/{plan.repeat}, jambalab {precision}")
            if not _failed(ours[precision]):
                spec = {"path": str(path), "precision": precision, "prompt": plan.prompt, "gen": plan.gen,
                        "repeat": 1, "threads": plan.threads}
                ours[precision].append(run_child("jambalab", spec, plan.timeout_s))
            bar.update(1)
            for p, kind in PAIRS:
                if p != precision or kind not in theirs or kind in done:
                    continue
                done.add(kind)
                step(f"{shape.key}: round {rnd + 1}/{plan.repeat}, llama-bench {kind}")
                if not _failed(theirs[kind]):
                    try:
                        theirs[kind].append(llama_bench(llama, ggufs[kind], plan.threads, plan.prompt, plan.gen, 1,
                                                        plan.timeout_s))
                    except (RuntimeError, KeyError) as e:
                        theirs[kind].append({"error": str(e)})
                bar.update(1)
    res.jambalab[shape.key] = {p: _merge(rounds) for p, rounds in ours.items()}
    for kind, rounds in theirs.items():
        got = _merge(rounds)
        if "error" not in got:
            got["bytes_per_token"] = gguf_bytes_per_token(llama, ggufs[kind], top_k, n_experts)
        res.llama_cpp[shape.key][kind] = got
    if llama is None:
        return
    step(f"{shape.key}: parity")
    res.parity[shape.key] = _parity(llama, path, work / "gguf", plan)
    bar.update(1)


def _bad(round_: dict) -> bool:
    """A round that failed or whose precision this jambalab cannot load."""
    return "error" in round_ or "unsupported" in round_


def _failed(rounds: list[dict]) -> bool:
    return any(_bad(r) for r in rounds)


def _merge(rounds: list[dict]) -> dict:
    """One engine's rounds for one precision -> best of all their samples, prefill and decode; an error or
    an unsupported precision as it came."""
    bad = next((r for r in rounds if _bad(r)), None)
    if bad is not None:
        return bad
    out = {k: v for k, v in rounds[0].items() if k not in ("prefill", "decode")}
    for what in ("prefill", "decode"):
        samples = [x for r in rounds for x in (r[what]["samples"] if isinstance(r[what], dict) else r[what])]
        out[what] = best_of(samples)
    return out


def _parity(llama: LlamaCpp, model_dir: Path, gguf_dir: Path, plan: Plan) -> dict:
    gguf = gguf_dir / f"{model_dir.name}-f32.gguf"
    if llama.bindings is None or llama.lib_dir is None:
        return {"skipped": "no llama-cpp-python sdist around the llama.cpp tree, or no libllama.so beside "
                           "llama-bench; docs/precision.md records the parity measured by hand"}
    if not gguf.is_file():
        return {"skipped": "no F32 GGUF (fp32 not measured)"}
    spec = {"path": str(model_dir), "gguf": str(gguf), "llama": [str(llama.bench), str(llama.quantize),
            str(llama.source)], "tokens": plan.parity_tokens, "prompt": 16, "threads": plan.threads}
    return run_child("parity", spec, plan.timeout_s)


def measure_parity(spec: dict) -> dict:
    """Child side: greedy tokens (after a random prompt) and the prompt's last logits, both engines, fp32."""
    import torch

    import jambalab
    from jambalab.bench.llamacpp import greedy

    torch.set_num_threads(spec["threads"])
    model = jambalab.from_pretrained(spec["path"], dtype="float32")
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, model.config.vocab_size, (1, spec["prompt"]), generator=gen)  # (1, L)
    with torch.inference_mode():
        first = model(ids).logits[0, -1]  # (V,)
        cache = model.allocate_cache(1, max_length=ids.shape[1] + spec["tokens"])
        tok, ours = model(ids, cache=cache, logits_to_keep=1).logits[:, -1].argmax(-1, keepdim=True), []
        for _ in range(spec["tokens"]):
            ours.append(int(tok))
            tok = model(tok, cache=cache).logits[:, -1].argmax(-1, keepdim=True)
    llama = LlamaCpp(*(Path(x) for x in spec["llama"]))
    theirs, their_first = greedy(llama, Path(spec["gguf"]), ids[0].tolist(), spec["tokens"], spec["threads"])
    diff = (first - torch.tensor(their_first[:first.numel()])).abs().max().item()
    same = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), len(ours))
    return {"tokens_equal": same, "tokens": len(ours), "first_logits_max_abs_diff": diff,
            "logit_std": first.std().item()}


CHILDREN["parity"] = measure_parity


# =======================================================================================
# Tables and plot
# =======================================================================================
def _fmt(v: float | None) -> str:
    if v is None:
        return "n/a"
    return f"{v:,.0f}" if v >= 100 else f"{v:.1f}" if v >= 10 else f"{v:.2f}"


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.0f}%" if v >= 10 else f"{v:.1f}%"


def _best(m: dict | None, what: str) -> float | None:
    return m[what]["best"] if m and isinstance(m.get(what), dict) else None


def _median(m: dict | None, what: str) -> float | None:
    return statistics.median(m[what]["samples"]) if m and isinstance(m.get(what), dict) else None


def _cell(ours: float | None, theirs: float | None, with_llama: bool) -> str:
    if not with_llama:
        return _fmt(ours)
    ratio = f" ({ours / theirs:.2f}x)" if ours and theirs else ""
    return f"{_fmt(ours)} / {_fmt(theirs)}{ratio}"


def _bound_pct(m: dict | None, read_gbs: float | None) -> float | None:
    tps = _best(m, "decode")
    if tps is None or not read_gbs or not m.get("bytes_per_token"):
        return None
    return 100 * m["bytes_per_token"] * tps / (read_gbs * 1e9)


def _grid(head: list[str], rows: list[list[str]]) -> list[str]:
    lines = [head, *rows]
    widths = [max(len(r[i]) for r in lines) for i in range(len(head))]
    text = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in lines]
    text.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return text


def _pairs(results: dict) -> list[tuple[str, str]]:
    precisions = results["plan"]["precisions"]
    with_llama = bool(results["llama_cpp"])
    pairs = [(p, g) for p, g in PAIRS if p in precisions]
    if not with_llama:  # one row per jambalab precision
        pairs = [(p, g) for i, (p, g) in enumerate(pairs) if p not in [q for q, _ in pairs[:i]]]
    return pairs


def table(results: dict) -> str:
    with_llama = bool(results["llama_cpp"])
    keys = list(results["models"])
    plan, bw = results["plan"], results["machine"].get("read_gbs")
    who = "jambalab / llama.cpp" if with_llama else "jambalab"
    head = ["precision"]
    for k in keys:
        head += [f"{k} prefill {plan['prompt']}: {who}", f"{k} decode {plan['gen']}"]
    speed, bound = [], []
    for p, g in _pairs(results):
        label = f"{p} / {g}" if with_llama else p
        row, brow = [label], [label]
        for k in keys:
            ours, theirs = results["jambalab"][k].get(p), results["llama_cpp"].get(k, {}).get(g)
            for what in ("prefill", "decode"):
                row.append(_cell(_best(ours, what), _best(theirs, what), with_llama))
            b_ours, b_theirs = _bound_pct(ours, bw), _bound_pct(theirs, bw)
            brow.append(_pct(b_ours) + (f" / {_pct(b_theirs)}" if with_llama else ""))
        speed.append(row)
        bound.append(brow)
    text = [f"tokens/s, best of {plan['repeat']}, {plan['threads']} threads"
            + (" (ratio = jambalab / llama.cpp)" if with_llama else ""), *_grid(head, speed), ""]
    if with_llama and plan["repeat"] >= 3:
        text += [f"ratio of the medians of the {plan['repeat']} rounds, jambalab / llama.cpp (less swayed than "
                 "a best of N by one fast moment of the machine)",
                 *_grid(_ratio_head(keys), _median_rows(results, keys)), ""]
    text += [f"decode as % of the bandwidth bound (weight bytes per token x tokens/s / {_fmt(bw)} GB/s read)",
             *_grid(["precision", *[f"{k} decode: {who}" for k in keys]], bound), ""]
    text += _footer(results)
    return "\n".join(text)


def _ratio_head(keys: list[str]) -> list[str]:
    return ["precision", *[f"{k} {what}" for k in keys for what in ("prefill", "decode")]]


def _median_rows(results: dict, keys: list[str]) -> list[list[str]]:
    rows = []
    for p, g in _pairs(results):
        row = [f"{p} / {g}"]
        for k in keys:
            ours, theirs = results["jambalab"][k].get(p), results["llama_cpp"].get(k, {}).get(g)
            for what in ("prefill", "decode"):
                a, b = _median(ours, what), _median(theirs, what)
                row.append(f"{a / b:.2f}x" if a and b else "n/a")
        rows.append(row)
    return rows


def _limits(machine: dict) -> str:
    """The run's ISA-limiting settings (machine.isa_limits), as NAME=value, ..."""
    return ", ".join(f"{k}={v}" for k, v in (machine.get("isa_limits") or {}).items())


def _footer(results: dict) -> list[str]:
    m = results["machine"]
    out = [f"machine: {m['cpu']}, {m['cpus']} CPUs, {m['threads']} threads per engine, load {m.get('load_1min')} "
           f"(start) / {m.get('load_1min_end')} (end), read bandwidth {_fmt(m.get('read_gbs'))} GB/s"]
    if m.get("isa_limits"):
        out.append(f"instruction set held below this CPU's for jambalab (llama.cpp: as its build): {_limits(m)}")
    for k, d in results["models"].items():
        n = d["params"]
        size = f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"
        out.append(f"{k}: {d['name']} ({size} parameters), {d['path']}")
    spreads = [f["spread_pct"] for eng in ("jambalab", "llama_cpp") for per in results[eng].values()
               for m_ in per.values() for f in (m_.get("prefill"), m_.get("decode")) if isinstance(f, dict)]
    if spreads and results["plan"]["repeat"] > 1:
        out.append(f"spread (max - min) / max of the timed runs: at most {max(spreads):.0f}%")
    for eng, name in (("jambalab", "jambalab"), ("llama_cpp", "llama.cpp")):
        for k, per in results[eng].items():
            for p, m_ in per.items():
                if "unsupported" in m_:
                    out.append(f"note: {name} {k} {p}: n/a, this jambalab cannot load it ({m_['unsupported']})")
                elif "error" in m_:
                    out.append(f"note: {name} {k} {p}: failed: {m_['error']}")
    for k, par in results["parity"].items():
        if "tokens_equal" in par:
            out.append(f"parity {k} (fp32 / F32): greedy tokens equal for {par['tokens_equal']} of {par['tokens']}; "
                       f"first logits differ by at most {par['first_logits_max_abs_diff']:.1e} "
                       f"(logit std {par['logit_std']:.2f})")
        else:
            out.append(f"parity {k}: {par.get('skipped') or par.get('error')}")
    out += [f"note: {n}" for n in results["notes"]]
    return out


def _whiskers(figs: list[dict | None], what: str) -> tuple[list[float], list[float], list[float]]:
    """Per figure: the median of its rounds, and how far below and above it the slowest and fastest went
    (0 for a figure that was not measured)."""
    mid, lo, hi = [], [], []
    for m in figs:
        samples = m[what]["samples"] if m and isinstance(m.get(what), dict) else [0.0]
        med = statistics.median(samples)
        mid.append(med), lo.append(med - min(samples)), hi.append(max(samples) - med)
    return mid, lo, hi


def plot(results: dict, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys, pairs = list(results["models"]), _pairs(results)
    fig, axes = plt.subplots(len(keys), 2, figsize=(11, 3.2 * len(keys)), squeeze=False)
    labels = [f"{p}\n{g}" if results["llama_cpp"] else p for p, g in pairs]
    x = range(len(pairs))
    for row, k in enumerate(keys):
        for col, what in enumerate(("prefill", "decode")):
            ax = axes[row][col]
            engines = [("jambalab", [results["jambalab"][k].get(p) for p, _ in pairs], -0.2, "tab:blue")]
            if results["llama_cpp"]:
                engines.append(("llama.cpp", [results["llama_cpp"].get(k, {}).get(g) for _, g in pairs], 0.2,
                                "tab:orange"))
            for name, figs, dx, color in engines:
                mid, lo, hi = _whiskers(figs, what)
                ax.bar([i + dx for i in x], mid, 0.4, yerr=[lo, hi], capsize=2, label=name, color=color,
                       error_kw={"elinewidth": 0.8})
            ax.set_xticks(list(x), labels, fontsize=8)
            ax.set_ylabel("tokens/s (median, min-max)")
            ax.set_title(f"{k} ({results['models'][k]['name']}): {what}", fontsize=10)
            ax.legend(fontsize=8)
    m = results["machine"]
    isa = "\n" + textwrap.fill(f"jambalab held below this CPU's instruction set: {_limits(m)}", width=100)
    fig.suptitle(f"jambalab vs llama.cpp: {m['cpu']}, {m['threads']} threads each, "
                 f"{results['plan']['repeat']} interleaved rounds" + (isa if m.get("isa_limits") else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# =======================================================================================
# Command line: `jambalab bench peers` (registered in jambalab/commands/bench.py)
# =======================================================================================
def add_parser(group) -> None:
    p = group.add_parser("peers", help="jambalab vs llama.cpp on the same checkpoints, fp32 to 4-bit",
                         description=__doc__, formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    p.add_argument("--llama-bench", metavar="PATH", help="llama.cpp's llama-bench binary (llama-quantize beside it)")
    p.add_argument("--llama-cpp-dir", metavar="DIR", help="the llama.cpp source tree (convert_hf_to_gguf.py, gguf-py)")
    p.add_argument("--work", default="bench-out/peers", help="checkpoints and GGUF files, kept for reruns "
                   "(default bench-out/peers; ~20 GB at full size)")
    p.add_argument("--layers", type=int, help="layers of the Falcon-Mamba-7B-shaped model A (default 6)")
    p.add_argument("--models", help="A, B or A,B (default)")
    p.add_argument("--precisions", help=f"comma-separated subset of {','.join(PRECISIONS)} (default all)")
    p.add_argument("--repeat", type=int, help="timed runs per figure, best kept (default 3)")
    p.add_argument("--threads", type=int, help="threads for both engines (default 2)")
    p.add_argument("--quick", action="store_true", help="tiny shapes, 32-token prompt, 8 tokens, one run (tests)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the tables")
    p.add_argument("--plot", metavar="PATH", help="write a PNG: tokens/s per precision, both engines")
    p.set_defaults(func=main)


def plan_from(args) -> Plan:
    plan = QUICK if args.quick else Plan()
    for name in ("layers", "repeat", "threads"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise InputError(f"--{name} must be >= 1, got {v}")
    if args.layers is not None:
        plan = replace(plan, a_layers=args.layers)
    if args.repeat is not None:
        plan = replace(plan, repeat=args.repeat)
    if args.threads is not None:
        plan = replace(plan, threads=args.threads)
    if args.models:
        plan = replace(plan, models=_choose(args.models, ("A", "B"), "--models"))
    if args.precisions:
        plan = replace(plan, precisions=_choose(args.precisions, tuple(PRECISIONS), "--precisions"))
    return plan


def _choose(text: str, allowed: tuple[str, ...], flag: str) -> tuple[str, ...]:
    got = tuple(s.strip() for s in text.split(",") if s.strip())
    bad = [s for s in got if s not in allowed]
    if bad or not got:
        raise InputError(f"{flag}: unknown {bad or text!r}; choose from {', '.join(allowed)}")
    return got


def main(args) -> int:
    plan = plan_from(args)
    llama = find_llama_cpp(args.llama_bench, args.llama_cpp_dir)
    results = run(plan, Path(args.work), llama)
    if args.plot:
        plot(results, args.plot)
        results["plot"] = str(args.plot)
    print(json.dumps(results, indent=1) if args.json else table(results))
    return 0


def child_main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    print(json.dumps(CHILDREN[argv[0]](json.loads(argv[1]))))
    return 0


if __name__ == "__main__":
    sys.exit(child_main())
