"""`jambalab bench vision`: the Vim paper's Fig. 1 (b) and (c) on this machine.

Images per second and peak inference memory of Vim-Ti (jambalab, 7,148,008 parameters) against
DeiT-Ti (the shape of timm's deit_tiny_patch16_224, 5,717,416 parameters; jambalab.vision.vit),
random weights, the same batch, at 224, 512, 640, 738, 1024 and 1248 px (1248 px = 6,084 patch tokens
for both: patch 16, stride 16; a size that is not a multiple of 16 runs at the multiple below it, as
the official patch conv drops the rest: 738 px gives 46 x 46 patches). DeiT runs twice: with torch's fused SDPA attention (what timm uses
today) and with explicit softmax attention, the (B, 3, T, T) matrix materialised (what the paper's
DeiT ran).

Method. Every (model, size) point runs in a fresh interpreter (jambalab.bench.probe.run_in_child,
glibc's mmap threshold fixed so freed tensors leave the resident set). The child builds the model,
runs one batch-1 forward at the size (faults in code pages, compiles jambalab's kernels), records its
resident memory (weights, input, runtime) as the baseline, resets the kernel's peak counter
(/proc/self/clear_refs) and runs `repeats` timed forwards of the whole batch under torch.no_grad().
Throughput = batch / the best forward's wall time. Memory = peak resident (VmHWM) minus the
baseline: what inference needed on top of the weights, the analogue of the paper's GPU memory.

    python -m jambalab.bench.vision '{"model": "vim", "size": 224, "batch": 4}'   # one point, one JSON line
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

MODELS = {"vim": "Vim-Ti", "deit-sdpa": "DeiT-Ti (SDPA)", "deit-explicit": "DeiT-Ti (explicit)"}
SIZES = (224, 512, 640, 738, 1024, 1248)
QUICK_SIZES = (32, 64)
# The paper (arXiv 2401.09417, Fig. 1 and Sec. 1; one A800 GPU, batch inference): at 1248 px Vim-Ti
# is 2.8x faster than DeiT-Ti and uses 86.8% less GPU memory. Only these two figures are stated
# numerically in the text; the bars at the other sizes are not, so none are printed for them.
PAPER = {1248: {"speedup": 2.8, "memory_saving": 0.868}}


# ---------------------------------------------------------------------------------------
# One point (in the child)
# ---------------------------------------------------------------------------------------
def aligned(size: int) -> int:
    """The largest multiple of the patch size 16 <= size. The official patch conv drops the pixels
    past the last whole patch, so the paper's 738 px runs as 736 px: the same 46 x 46 patches."""
    return size - size % 16


def build(model: str, size: int):
    from jambalab.vision import VimConfig, VisionMamba
    from jambalab.vision.vit import ViTConfig, VisionTransformer

    if model == "vim":
        return VisionMamba.from_config(VimConfig.from_preset("vim-tiny", img_size=size), seed=0).eval()
    attention = model.split("-", 1)[1]
    return VisionTransformer.from_config(ViTConfig.from_preset("deit-tiny", img_size=size, attention=attention),
                                         seed=0).eval()


def measure(model: str, size: int, batch: int, repeats: int, threads: int) -> dict:
    import torch

    from jambalab.bench.probe import peak_bytes, reset_peak, rss_bytes

    torch.set_num_threads(threads)
    net = build(model, aligned(size))
    images = torch.randn(batch, 3, aligned(size), aligned(size), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        net(images[:1])
        baseline = rss_bytes()
        reset_peak()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            net(images)
            times.append(time.perf_counter() - t0)
    return {"model": model, "size": size, "batch": batch, "threads": threads, "seconds": times,
            "images_per_s": batch / min(times), "memory_bytes": peak_bytes() - baseline, "baseline_bytes": baseline,
            "parameters": sum(p.numel() for p in net.parameters())}


# ---------------------------------------------------------------------------------------
# The sweep (in the parent)
# ---------------------------------------------------------------------------------------
def run(sizes: tuple[int, ...], batch: int, repeats: int, threads: int, timeout_s: int,
        models: tuple[str, ...] = tuple(MODELS)) -> dict:
    from tqdm import tqdm

    from jambalab.bench.machine import machine_info
    from jambalab.bench.probe import run_in_child

    points = []
    todo = [(m, s) for s in sizes for m in models]
    with tqdm(todo, unit="run", desc="bench vision", dynamic_ncols=True) as bar:
        for m, s in bar:
            bar.set_postfix_str(f"{MODELS[m]} {s} px")
            spec = {"model": m, "size": s, "batch": batch, "repeats": repeats, "threads": threads}
            r = run_in_child(spec, timeout_s, module="jambalab.bench.vision")
            points.append({"model": m, "size": s, **r})
    return {"machine": machine_info(), "batch": batch, "repeats": repeats, "threads": threads, "sizes": list(sizes),
            "points": points, "paper": {str(k): v for k, v in PAPER.items()}}


def _point(results: dict, model: str, size: int) -> dict | None:
    for p in results["points"]:
        if p["model"] == model and p["size"] == size and "error" not in p:
            return p
    return None


def table(results: dict) -> str:
    head = (f"{'px':>5} {'tokens':>6} | {'images/s':^32} | {'inference memory (MiB)':^32} | {'Vim vs DeiT':^31} "
            f"| paper (A800)")
    sub = (f"{'':>12} | {'Vim':>10}{'SDPA':>11}{'explicit':>11} | {'Vim':>10}{'SDPA':>11}{'explicit':>11} | "
           f"{'speed x':>9}{'saved (expl)':>13}{'(SDPA)':>9} |")
    lines = [head, sub, "-" * len(head)]
    for s in results["sizes"]:
        pts = [_point(results, m, s) for m in MODELS]
        ips = "".join(f"{p['images_per_s']:>{w}.3g}" if p else f"{'fail':>{w}}" for p, w in zip(pts, (10, 11, 11)))
        mem = "".join(f"{p['memory_bytes'] / 2**20:>{w}.1f}" if p else f"{'fail':>{w}}" for p, w in zip(pts, (10, 11, 11)))
        vim, sdpa, expl = pts
        speed = f"{vim['images_per_s'] / expl['images_per_s']:>8.2f}x" if vim and expl else f"{'':>9}"
        save_e, save_s = f"{_saving(vim, expl):>12}", f"{_saving(vim, sdpa):>9}"
        paper = PAPER.get(s)
        paper_txt = f"{paper['speedup']}x, {paper['memory_saving']:.1%} saved" if paper else ""
        lines.append(f"{s:>5} {(aligned(s) // 16) ** 2 + 1:>6} | {ips} | {mem} | {speed} {save_e}{save_s} | {paper_txt}")
    errors = [f"  {MODELS[p['model']]} {p['size']} px: {p['error']}" for p in results["points"] if "error" in p]
    m = results["machine"]
    lines.append(f"\nbatch {results['batch']}, best of {results['repeats']} forward(s), {results['threads']} thread(s); "
                 f"{m['cpus']} CPUs ({m['cpu']}), load average {m['load_1min'] or 0:.1f} at the end; speed and saving against explicit-attention "
                 f"DeiT as in the paper, saving against SDPA beside it")
    return "\n".join(lines + (["failed points:"] + errors if errors else []))


def _saving(vim: dict | None, deit: dict | None) -> str:
    """1 - Vim's memory / DeiT's, where DeiT needed at least 1 MiB (below that it is page noise)."""
    if not vim or not deit or deit["memory_bytes"] < 2**20:
        return ""
    return f"{1 - vim['memory_bytes'] / deit['memory_bytes']:.1%}"


def plot(results: dict, out: Path) -> None:
    """Two panels like the paper's Fig. 1 (b) speed and (c) memory, against resolution."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_s, ax_m) = plt.subplots(1, 2, figsize=(11, 4))
    for m, label in MODELS.items():
        pts = [p for p in (_point(results, m, s) for s in results["sizes"]) if p]
        if not pts:
            continue
        style = dict(marker="o", ms=4, label=label, ls="-" if m == "vim" else ("--" if m == "deit-sdpa" else ":"))
        ax_s.plot([p["size"] for p in pts], [p["images_per_s"] for p in pts], **style)
        ax_m.plot([p["size"] for p in pts], [p["memory_bytes"] / 2**20 for p in pts], **style)
    ax_s.set_yscale("log")
    ax_s.set_ylabel("images / s (log)")
    ax_m.set_ylabel("peak inference memory above weights (MiB)")
    for ax, title in ((ax_s, "(b) speed"), (ax_m, "(c) memory")):
        ax.set_xlabel("resolution (px)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"Vim-Ti vs DeiT-Ti, batch {results['batch']}, {results['threads']} CPU thread(s)")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------
# CLI (`jambalab bench vision`)
# ---------------------------------------------------------------------------------------
def add_parser(group) -> None:
    p = group.add_parser("vision", help="Vim-Ti vs DeiT-Ti: images/s and memory against resolution (Vim Fig. 1)",
                         description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=f"sizes {QUICK_SIZES}, batch 1, one repeat (tests, smoke runs)")
    p.add_argument("--sizes", help=f"comma-separated resolutions (default {','.join(map(str, SIZES))})")
    p.add_argument("--batch", type=int, help="images per forward, the same for every model (default 4)")
    p.add_argument("--repeats", type=int, help="timed forwards per point, best kept (default 2)")
    p.add_argument("--threads", type=int, default=2, help="torch threads in each run (default 2)")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per point before it is reported failed")
    p.add_argument("--out", default="bench-out", help="directory for vision.json and vision.png (default bench-out)")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object instead of the table")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from jambalab.commands.bench import _ints
    from jambalab.errors import InputError

    sizes = tuple(_ints(args.sizes, "--sizes") or (QUICK_SIZES if args.quick else SIZES))
    batch = args.batch or (1 if args.quick else 4)
    repeats = args.repeats or (1 if args.quick else 2)
    for name, v in (("--batch", batch), ("--repeats", repeats), ("--threads", args.threads)):
        if v < 1:
            raise InputError(f"{name} must be >= 1, got {v}")
    bad = [s for s in sizes if s < 16]
    if bad:
        raise InputError(f"--sizes {bad}: each resolution must be at least the patch size 16")
    results = run(sizes, batch, repeats, args.threads, args.timeout)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vision.json").write_text(json.dumps(results, indent=1))
    plot(results, out / "vision.png")
    print(json.dumps(results) if args.json else table(results))
    if not args.json:
        print(f"wrote {out / 'vision.json'}, {out / 'vision.png'}")
    return 0


def child_main(argv: list[str]) -> int:
    spec = json.loads(argv[0])
    print(json.dumps(measure(spec["model"], spec["size"], spec["batch"], spec.get("repeats", 2), spec.get("threads", 2))))
    return 0


if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1:]))
