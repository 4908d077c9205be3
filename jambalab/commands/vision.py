"""`jambalab vision train|eval`: Vision Mamba image classifiers on CPU (see docs/vision.md).

train: with no arguments, a small Vim and a DeiT-style ViT of about the same size, one after the
other on the same data, steps and batches (scikit-learn's 8x8 digits, upscaled); prints their test
accuracy. eval: classify image files with a trained model directory (top-5).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from jambalab.errors import InputError

# The released models' preprocessing (vim/datasets.py, as DeiT): bicubic resize of the shorter side to
# img_size / 0.875 (256 for 224), center crop, ImageNet mean and std. No class names ship with them.
IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "invert": False, "labels": None,
            "crop": 0.875}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def register(sub) -> None:
    p = sub.add_parser("vision", help="Vision Mamba: train on digits, classify images", description=__doc__)
    group = p.add_subparsers(dest="vision", required=True, metavar="ACTION")
    t = group.add_parser("train", help="train a small Vim and a ViT beside it on the bundled digits")
    t.add_argument("--out", default="vision-out", help="output directory (default vision-out)")
    t.add_argument("--models", default="vim,vit", help="which to train: vim,vit (default both)")
    t.add_argument("--vim-preset", default="vim-digits", help="Vim preset (default vim-digits)")
    t.add_argument("--vit-preset", default="vit-digits", help="ViT preset (default vit-digits)")
    t.add_argument("--steps", type=int, default=1500, help="optimizer steps per model (default 1500)")
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--warmup", type=int, default=100, help="warmup steps (default 100)")
    t.add_argument("--val-every", type=int, default=100)
    t.add_argument("--ckpt-every", type=int, default=250)
    t.add_argument("--seed", type=int, default=0, help="data split, order, augmentation and init")
    t.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    t.add_argument("--resume", action="store_true", help="continue the runs in --out from their last checkpoints")
    t.set_defaults(func=run_train)
    e = group.add_parser("eval", help="classify images (top-5) with a trained model or an official checkpoint")
    src = e.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="a training output (e.g. vision-out/vim) or a model/ directory")
    src.add_argument("--official", help="an official hustvl/Vim checkpoint (.pth or .safetensors), with --preset")
    e.add_argument("--preset", default="vim-tiny", help="the official checkpoint's preset (default vim-tiny)")
    e.add_argument("--images", required=True, nargs="+", help="image files or directories of images")
    e.add_argument("--top", type=int, default=5, help="classes shown per image (default 5)")
    e.set_defaults(func=run_eval)


# ---------------------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------------------
def run_train(args: argparse.Namespace) -> int:
    from jambalab.commands.common import run_with_threads

    return run_with_threads(args.threads, lambda: _train(args))


def _train(args: argparse.Namespace) -> int:
    from jambalab.train.loop import TrainArgs
    from jambalab.vision.config import VimConfig
    from jambalab.vision.train import DigitsData, VisionTrainer, write_summary
    from jambalab.vision.vit import ViTConfig

    archs = [m.strip() for m in args.models.split(",") if m.strip()]
    if not archs or any(a not in ("vim", "vit") for a in archs):
        raise InputError(f"--models must be a comma-separated subset of vim,vit, got {args.models!r}")
    configs = {"vim": VimConfig.from_preset(args.vim_preset), "vit": ViTConfig.from_preset(args.vit_preset)}
    sizes = {configs[a].img_size for a in archs}
    if len(sizes) != 1:
        raise InputError(f"the models must take the same image size to share the data, got {sorted(sizes)}")
    for a in archs:
        if configs[a].channels != 1 or configs[a].num_classes != 10:
            raise InputError(f"{configs[a].name}: the digits need channels=1 and num_classes=10")
    train_args = TrainArgs(max_steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup,
                           min_lr_ratio=0.01, weight_decay=0.05, val_every=args.val_every,
                           ckpt_every=args.ckpt_every, seed=args.seed)
    data = DigitsData(sizes.pop(), args.seed)
    out = Path(args.out)
    print(f"data: scikit-learn digits upscaled to {configs[archs[0]].img_size} px: {len(data.train)} train, "
          f"{len(data.val)} validation, {len(data.test)} test images (seed {args.seed})")
    trainers = [VisionTrainer(a, configs[a].to_dict(), train_args, data, out / a, resume=args.resume) for a in archs]
    results = []
    for t in trainers:
        n = sum(p.numel() for p in t.model.parameters())
        print(f"{t.arch}: {configs[t.arch].name}, {n:,} parameters, {args.steps} steps of {args.batch_size} images")
        results.append(t.run())
    write_summary(out, results)
    print(f"\n{'model':<6}{'parameters':>12}{'steps':>7}{'test accuracy':>15}{'train s':>9}{'CPU s':>8}")
    for r in results:
        print(f"{r.arch:<6}{r.parameters:>12,}{r.steps:>7}{r.test_accuracy:>15.2%}{r.train_seconds:>9.0f}"
              f"{r.cpu_seconds:>8.0f}")
    print(f"\nwrote {out}/<model>/metrics.jsonl, loss.png, checkpoints/; classify images with "
          f"`jambalab vision eval --model {out / archs[0]} --images FILE...`")
    return 0


# ---------------------------------------------------------------------------------------
# eval
# ---------------------------------------------------------------------------------------
def run_eval(args: argparse.Namespace) -> int:
    import torch

    from jambalab.vision.model import softmax_top_k
    from jambalab.vision.store import load_model_dir

    if args.top < 1:
        raise InputError(f"--top must be >= 1, got {args.top}")
    if args.official:
        from jambalab.vision import from_official

        model, prep = from_official(args.official, args.preset), IMAGENET
    else:
        model, prep = load_model_dir(_model_dir(Path(args.model)))
    files = _image_files(args.images)
    batch = torch.stack([load_image(f, model.config.channels, model.config.img_size, prep) for f in files])
    with torch.no_grad():
        probs, classes = softmax_top_k(model(batch), args.top)
    labels = prep.get("labels") or [f"class {i}" for i in range(model.config.num_classes)]
    for f, p, c in zip(files, probs.tolist(), classes.tolist()):
        print(f"{f}: " + ", ".join(f"{labels[i]} {q:.1%}" for i, q in zip(c, p)))
    return 0


def _model_dir(path: Path) -> Path:
    """A model directory as given, or the latest checkpoint's model/ under a training output."""
    from jambalab.train.checkpoint import MODEL_DIR, latest_checkpoint
    from jambalab.vision.store import META_FILE

    if (path / META_FILE).is_file():
        return path
    last = latest_checkpoint(path / "checkpoints")
    if last is None:
        raise InputError(f"--model {path}: neither a vision model directory nor a training output with checkpoints")
    return last / MODEL_DIR


def _image_files(items: list[str]) -> list[Path]:
    files: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise InputError(f"--images {p}: no image files ({', '.join(IMAGE_SUFFIXES)}) in this directory")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise InputError(f"--images {p}: no such file or directory")
    return files


def load_image(path: Path, channels: int, img_size: int, prep: dict):
    """A (channels, img_size, img_size) tensor, preprocessed as in training: grey or RGB, resized
    bilinearly (or, with prep["crop"], the shorter side bicubically to img_size / crop and then
    center-cropped), scaled to [0, 1] (inverted if the model learned light ink on a dark ground),
    normalised."""
    import numpy as np
    import torch
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("L" if channels == 1 else "RGB")
            im = _resize_crop(im, img_size, prep["crop"]) if prep.get("crop") else im.resize((img_size, img_size),
                                                                                             Image.BILINEAR)
            x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0)
    except (UnidentifiedImageError, OSError) as e:
        raise InputError(f"{path}: not a readable image ({type(e).__name__})") from None
    if channels == 1:
        x = x[None]  # (1, S, S)
    else:
        x = x.permute(2, 0, 1)  # (3, S, S)
    if prep.get("invert"):
        x = 1.0 - x
    return (x - torch.tensor(prep["mean"]).reshape(-1, 1, 1)) / torch.tensor(prep["std"]).reshape(-1, 1, 1)


def _resize_crop(im, img_size: int, crop: float):
    from PIL import Image

    short = round(img_size / crop)
    w, h = im.size
    scale = short / min(w, h)
    im = im.resize((max(img_size, round(w * scale)), max(img_size, round(h * scale))), Image.BICUBIC)
    left, top = (im.size[0] - img_size) // 2, (im.size[1] - img_size) // 2
    return im.crop((left, top, left + img_size, top + img_size))
