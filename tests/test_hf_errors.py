"""Bad checkpoints: every problem is one clear CheckpointError/ConfigError naming the file, key and shapes."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import jambalab
from jambalab.errors import CheckpointError, ConfigError, InputError, JambalabError


@pytest.fixture()
def ckpt(tmp_path):
    model = jambalab.from_preset("tiny-hybrid", seed=0)
    model.save_pretrained(tmp_path)
    return tmp_path


def _edit_weights(path, fn):
    tensors = load_file(str(path / "model.safetensors"))
    fn(tensors)
    save_file(tensors, str(path / "model.safetensors"))


def test_missing_directory_and_config(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        jambalab.from_pretrained(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no config.json"):
        jambalab.from_pretrained(tmp_path)


def test_missing_weights(ckpt):
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="holds no weights"):
        jambalab.from_pretrained(ckpt)


def test_unknown_model_type_and_bad_json(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps(dict(cfg, model_type="llama")))
    with pytest.raises(CheckpointError, match="model_type 'llama' is not supported"):
        jambalab.from_pretrained(ckpt)
    (ckpt / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        jambalab.from_pretrained(ckpt)


def test_config_value_out_of_range(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps(dict(cfg, attn_layer_offset=9)))
    with pytest.raises(ConfigError, match="attn_layer_offset=9"):
        jambalab.from_pretrained(ckpt)


def test_missing_tensor_is_named(ckpt):
    _edit_weights(ckpt, lambda t: t.pop("model.layers.1.feed_forward.experts.2.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor.*experts\.2\.up_proj"):
        jambalab.from_pretrained(ckpt)


def test_extra_tensor_is_an_error_not_a_skip(ckpt):
    _edit_weights(ckpt, lambda t: t.__setitem__("model.layers.0.surprise", torch.zeros(3)))
    with pytest.raises(CheckpointError, match=r"unexpected tensor.*surprise"):
        jambalab.from_pretrained(ckpt)


def test_misshaped_tensor_names_both_shapes(ckpt):
    def shrink(t):
        t["model.layers.0.mamba.A_log"] = t["model.layers.0.mamba.A_log"][:, :4].contiguous()

    _edit_weights(ckpt, shrink)
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mamba\.A_log has shape \[128, 4\].*\[128, 8\]"):
        jambalab.from_pretrained(ckpt)


def test_truncated_safetensors(ckpt):
    f = ckpt / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        jambalab.from_pretrained(ckpt)


def test_corrupt_header(ckpt):
    (ckpt / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        jambalab.from_pretrained(ckpt)


def test_index_pointing_to_missing_shard(ckpt):
    from jambalab.hf import save_pretrained

    model = jambalab.from_pretrained(ckpt)
    save_pretrained(model, ckpt, max_shard_bytes=200_000)
    next(ckpt.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="does not exist"):
        jambalab.from_pretrained(ckpt)


def test_token_ids_outside_vocab():
    model = jambalab.from_preset("tiny-mamba")
    with pytest.raises(InputError, match="token id 512 is outside the vocabulary"):
        model(torch.tensor([[1, 512]]))
    with pytest.raises(InputError, match="token id -1"):
        model(torch.tensor([[-1, 3]]))


def test_unexportable_config_refused(tmp_path):
    model = jambalab.from_preset("tiny-transformer", rope=True)
    with pytest.raises(CheckpointError, match="rope=True"):
        model.save_pretrained(tmp_path)


def test_all_errors_share_one_base():
    for cls in (CheckpointError, ConfigError, InputError):
        assert issubclass(cls, JambalabError)


def test_cli_prints_one_line_and_exits_nonzero(tmp_path):
    r = subprocess.run([sys.executable, "-m", "jambalab", "info", "--model", str(tmp_path / "missing")],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "does not exist" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_weight_is_named_at_load(ckpt, bad):
    name = "model.layers.3.mamba.out_proj.weight"

    def poison(t):
        t[name][3, 5] = bad

    _edit_weights(ckpt, poison)
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: tensor {name} holds .*(NaN|Inf)"):
        jambalab.from_pretrained(ckpt)


def test_value_beyond_float16_range_is_an_error_when_loading_in_float16(ckpt):
    name = "model.final_layernorm.weight"
    _edit_weights(ckpt, lambda t: t[name].__setitem__(0, 1e6))
    jambalab.from_pretrained(ckpt, dtype="float32")  # finite: fine in fp32
    with pytest.raises(CheckpointError, match=rf"tensor {name} overflows float16"):
        jambalab.from_pretrained(ckpt, dtype="float16")


def test_an_unknown_quantization_scheme_is_named(ckpt):
    from jambalab.errors import InputError

    with pytest.raises(InputError, match="quantize must be one of .*'int3'"):
        jambalab.from_pretrained(ckpt, quantize="int3")


def test_quantize_hook_gets_the_loaded_model(ckpt, monkeypatch):
    from jambalab import quant

    seen = {}

    def fake(model, how, group_size=None):
        seen.update(how=how, group_size=group_size, dtype=model.embed.weight.dtype)
        return model

    monkeypatch.setattr(quant, "quantize_model", fake, raising=False)
    jambalab.from_pretrained(ckpt, dtype="bfloat16", quantize="int4", group_size=64)
    assert seen == {"how": "int4", "group_size": 64, "dtype": torch.bfloat16}
    with pytest.raises(InputError, match="group_size=64 needs quantize"):
        jambalab.from_pretrained(ckpt, group_size=64)


def test_training_checkpoint_and_run_directories_load(ckpt, tmp_path):
    import shutil

    step = tmp_path / "run" / "checkpoints" / "step-00000373"
    shutil.copytree(ckpt, step / "model")
    want = jambalab.from_pretrained(ckpt).state_dict()
    for where in (step, tmp_path / "run"):
        got = jambalab.from_pretrained(where).state_dict()
        assert all(torch.equal(got[k], want[k]) for k in want)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json, model/ or checkpoints"):
        jambalab.from_pretrained(tmp_path / "empty")
