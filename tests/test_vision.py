"""Vision Mamba: presets, the fused ops against their references, and parity with the official forward.

The official code cannot be imported here (it needs CUDA-only packages). `official_forward` below is
an independent, deliberately naive re-implementation of the official model's forward pass from its
documented computation (shared/VIM.md, "The forward pass of the released models"), reading the
state dict in the official key layout: token-by-token loops, no jambalab code.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import jambalab.ops as ops
from jambalab.errors import CheckpointError, ConfigError, InputError
from jambalab.ops import cpu
from jambalab.vision import VimConfig, VisionMamba, from_official, from_preset
from jambalab.vision.official import interpolate_pos_embed, official_key_map

OFFICIAL_COUNTS = {"vim-tiny": 7_148_008, "vim-tiny-plus": 7_250_344, "vim-small": 25_796_584,
                   "vim-small-plus": 26_001_256, "vim-base": 97_598_440}


# ---------------------------------------------------------------------------------------
# The official computation, written out from shared/VIM.md
# ---------------------------------------------------------------------------------------
def _rms(x: torch.Tensor, w: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _branch(x, z, sd, p, suffix_conv, suffix_proj, a_name, d_name):
    """One direction over x, z (T, E) in its own scan order."""
    T, E = x.shape
    w, b = sd[f"{p}conv1d{suffix_conv}.weight"][:, 0], sd[f"{p}conv1d{suffix_conv}.bias"]  # (E, 4), (E,)
    xp = torch.cat([torch.zeros(3, E), x])  # left zero padding of 3
    u = torch.stack([(xp[t:t + 4].T * w).sum(-1) + b for t in range(T)])  # (T, E)
    u = F.silu(u)
    xdbl = u @ sd[f"{p}x_proj{suffix_proj}.weight"].T
    R = sd[f"{p}dt_proj{suffix_proj}.weight"].shape[1]
    N = sd[f"{p}{a_name}"].shape[1]
    dt, B, C = xdbl[:, :R], xdbl[:, R:R + N], xdbl[:, R + N:]
    delta = F.softplus(dt @ sd[f"{p}dt_proj{suffix_proj}.weight"].T + sd[f"{p}dt_proj{suffix_proj}.bias"])
    A = -torch.exp(sd[f"{p}{a_name}"])  # (E, N)
    h = torch.zeros(E, N)
    ys = []
    for t in range(T):
        h = torch.exp(delta[t][:, None] * A) * h + delta[t][:, None] * B[t][None, :] * u[t][:, None]
        ys.append(h @ C[t] + sd[f"{p}{d_name}"] * u[t])
    return torch.stack(ys) * F.silu(z)


def official_forward(sd: dict[str, torch.Tensor], images: torch.Tensor, stride: int, depth: int) -> torch.Tensor:
    out = []
    for img in images:
        x = F.conv2d(img[None], sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=stride)
        x = x[0].flatten(1).T  # (M, D), row-major patches
        M = x.shape[0]
        x = torch.cat([x[:M // 2], sd["cls_token"][0], x[M // 2:]]) + sd["pos_embed"][0]
        residual = None
        for i in range(depth):
            p = f"layers.{i}.mixer."
            residual = x if residual is None else x + residual
            normed = _rms(residual, sd[f"layers.{i}.norm.weight"])
            xz = normed @ sd[p + "in_proj.weight"].T
            E = xz.shape[1] // 2
            xs, z = xz[:, :E], xz[:, E:]
            y_f = _branch(xs, z, sd, p, "", "", "A_log", "D")
            y_b = _branch(xs.flip(0), z.flip(0), sd, p, "_b", "_b", "A_b_log", "D_b").flip(0)
            x = ((y_f + y_b) / 2) @ sd[p + "out_proj.weight"].T
        feat = _rms(x + residual, sd["norm_f.weight"])[M // 2]
        out.append(feat @ sd["head.weight"].T + sd["head.bias"])
    return torch.stack(out)


def random_official_state_dict(cfg: VimConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights in the official layout and shapes (VIM.md), none of them at its init value."""
    g = torch.Generator().manual_seed(seed)
    D, E, N, R, M = cfg.embed_dim, cfg.d_inner, cfg.d_state, cfg.dt_rank, cfg.num_patches

    def r(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    sd = {"patch_embed.proj.weight": r(D, cfg.channels, cfg.patch_size, cfg.patch_size, scale=0.1),
          "patch_embed.proj.bias": r(D), "cls_token": r(1, 1, D), "pos_embed": r(1, M + 1, D),
          "norm_f.weight": 1 + r(D), "head.weight": r(cfg.num_classes, D), "head.bias": r(cfg.num_classes)}
    for i in range(cfg.depth):
        p = f"layers.{i}."
        sd[p + "norm.weight"] = 1 + r(D)
        sd[p + "mixer.in_proj.weight"] = r(2 * E, D)
        sd[p + "mixer.out_proj.weight"] = r(D, E)
        for conv, proj, a, d in (("conv1d", "", "A_log", "D"), ("conv1d_b", "_b", "A_b_log", "D_b")):
            sd[p + f"mixer.{conv}.weight"] = r(E, 1, cfg.d_conv, scale=0.5)
            sd[p + f"mixer.{conv}.bias"] = r(E)
            sd[p + f"mixer.x_proj{proj}.weight"] = r(R + 2 * N, E)
            sd[p + f"mixer.dt_proj{proj}.weight"] = r(E, R)
            sd[p + f"mixer.dt_proj{proj}.bias"] = r(E) - 2
            sd[p + f"mixer.{a}"] = torch.log(torch.rand(E, N, generator=g) * 4 + 0.5)
            sd[p + f"mixer.{d}"] = 1 + r(E)
    return sd


@pytest.fixture
def official_file(tmp_path):
    cfg = VimConfig.from_preset("vim-test")
    sd = random_official_state_dict(cfg)
    path = tmp_path / "vim.pth"
    torch.save({"model": sd}, path)
    return cfg, sd, path


# ---------------------------------------------------------------------------------------
# Config and presets
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", OFFICIAL_COUNTS)
def test_preset_parameter_counts_equal_the_official_models(name):
    assert VisionMamba.on_meta(VimConfig.from_preset(name)).num_parameters() == OFFICIAL_COUNTS[name]


def test_preset_lookup_is_exact():
    with pytest.raises(ConfigError, match="unknown vision preset 'vim-tiny2'"):
        VimConfig.from_preset("vim-tiny2")
    with pytest.raises(ConfigError, match="unknown vision config field.*img_sz"):
        VimConfig.from_preset("vim-tiny", img_sz=1248)
    cfg = VimConfig.from_preset("vim-tiny", img_size=1248)
    assert (cfg.num_patches, cfg.cls_position) == (6084, 3042)  # the paper's 6,084 tokens at 1248 px


def test_image_size_must_fit_whole_patches():
    with pytest.raises(ConfigError, match="not divisible by stride 16"):
        VimConfig.from_preset("vim-tiny", img_size=230)


# ---------------------------------------------------------------------------------------
# Fused kernels against their references, through the whole model
# ---------------------------------------------------------------------------------------
REFS = {"selective_scan": ops.selective_scan_ref, "causal_conv1d": ops.causal_conv1d_ref,
        "dt_softplus": ops.dt_softplus_ref, "linear": F.linear, "rms_norm": ops.rms_norm_ref}


def _forward_backward(model, images, labels):
    model.zero_grad(set_to_none=True)
    logits = model(images)
    F.cross_entropy(logits, labels).backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("preset", ["vim-test", "vim-test-stride"])
def test_fused_ops_equal_reference_ops_forward_and_grads(preset, monkeypatch):
    if cpu.kernels() is None:
        pytest.skip("fused CPU kernels not built on this machine")
    model = from_preset(preset, seed=1)
    images, labels = torch.randn(3, 3, 32, 32), torch.tensor([1, 7, 3])
    fused_logits, fused_grads = _forward_backward(model, images, labels)
    with torch.no_grad():
        fused_eval = model(images)
    for name, ref in REFS.items():
        monkeypatch.setattr(ops, name, ref)
    ref_logits, ref_grads = _forward_backward(model, images, labels)
    torch.testing.assert_close(fused_logits, ref_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused_eval, ref_logits, atol=1e-5, rtol=1e-5)
    for n in ref_grads:
        torch.testing.assert_close(fused_grads[n], ref_grads[n], atol=1e-5, rtol=1e-4, msg=n)
    assert all(g.abs().sum() > 0 for n, g in ref_grads.items()), "every parameter gets a gradient"


# ---------------------------------------------------------------------------------------
# Official checkpoints
# ---------------------------------------------------------------------------------------
def test_key_map_is_exhaustive_both_ways():
    for preset in ("vim-tiny", "vim-test"):
        cfg = VimConfig.from_preset(preset)
        key_map = official_key_map(cfg)
        assert set(key_map) == set(random_official_state_dict(cfg) if preset == "vim-test" else key_map)
        assert sorted(key_map.values()) == sorted(VisionMamba.on_meta(cfg).state_dict())
    assert len(official_key_map(VimConfig.from_preset("vim-tiny"))) == 6 + 1 + 24 * 17


@pytest.mark.parametrize("preset", ["vim-test", "vim-test-stride"])
def test_from_official_matches_the_official_forward(preset, tmp_path):
    cfg = VimConfig.from_preset(preset)
    sd = random_official_state_dict(cfg, seed=3)
    torch.save({"model": sd}, tmp_path / "ckpt.pth")
    images = torch.randn(2, 3, 32, 32)
    expected = official_forward(sd, images, cfg.stride, cfg.depth)
    with torch.no_grad():
        got = from_official(tmp_path / "ckpt.pth", preset)(images)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_from_official_reads_safetensors(official_file, tmp_path):
    from safetensors.torch import save_file

    cfg, sd, path = official_file
    save_file(sd, str(tmp_path / "vim.safetensors"))
    a, b = from_official(path, "vim-test"), from_official(tmp_path / "vim.safetensors", "vim-test")
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


def test_position_embedding_is_resized_as_the_official_code(official_file):
    cfg, sd, path = official_file  # 32 px, patch 8: a 4 x 4 grid
    model = from_official(path, "vim-test", img_size=48)  # 6 x 6
    pe = sd["pos_embed"]
    grid = pe[:, 1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    resized = F.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
    expected = torch.cat([pe[:, :1], resized.reshape(1, 36, -1)], dim=1)  # row 0 kept, as vim/main.py
    torch.testing.assert_close(model.pos_embed.detach(), expected)
    assert torch.equal(interpolate_pos_embed(pe, 4), pe)  # same size: unchanged
    images = torch.randn(1, 3, 48, 48)
    sd48 = {**sd, "pos_embed": expected}
    with torch.no_grad():
        torch.testing.assert_close(model(images), official_forward(sd48, images, 8, cfg.depth), atol=1e-4, rtol=1e-4)


def test_checkpoint_errors_name_the_tensor(official_file, tmp_path):
    cfg, sd, path = official_file
    cases = {
        "missing": ({k: v for k, v in sd.items() if k != "layers.1.mixer.A_b_log"}, "layers.1.mixer.A_b_log is missing"),
        "extra": ({**sd, "layers.1.mixer.dt_bias": sd["layers.1.mixer.D"]}, "unexpected tensor layers.1.mixer.dt_bias"),
        "shape": ({**sd, "layers.0.mixer.D_b": torch.zeros(5)}, r"layers.0.mixer.D_b has shape \[5\], expected \[64\]"),
        "other": ({"blocks.0.attn.qkv.weight": torch.zeros(3, 3)}, "not a Vision Mamba checkpoint"),
    }
    for name, (bad, message) in cases.items():
        torch.save({"model": bad}, tmp_path / f"{name}.pth")
        with pytest.raises(CheckpointError, match=message):
            from_official(tmp_path / f"{name}.pth", "vim-test")
    (tmp_path / "junk.pth").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        from_official(tmp_path / "junk.pth", "vim-test")
    with pytest.raises(CheckpointError, match="the checkpoint has 2 layers, the preset 24"):
        from_official(path, "vim-tiny")
    with pytest.raises(CheckpointError, match=r"patch_embed.proj.weight has shape \[32, 3, 8, 8\], expected \[64, 3, 8, 8\]"):
        from_official(path, "vim-test", embed_dim=64)


def test_bad_images_are_refused_clearly():
    model = from_preset("vim-test")
    for images, message in ((torch.randn(1, 1, 32, 32), "1 channel"), (torch.randn(1, 3, 40, 40), "40x40 pixels"),
                            (torch.randn(3, 32, 32), "tensor, got"), (torch.zeros(1, 3, 32, 32, dtype=torch.uint8), "float")):
        with pytest.raises(InputError, match=message):
            model(images)
