"""Tokenizers: bytes, a checkpoint's tokenizer.json, chat templates (built offline with `tokenizers`)."""

import json

import pytest

from jambalab import JambaConfig
from jambalab.errors import CheckpointError, InputError
from jambalab.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer

TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n"
            "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello world"}]


def build_tokenizer_json(path, with_template_in_config: bool = True):
    """A tiny byte-level BPE with <pad>, <s>, </s>, trained offline; written like a checkpoint's files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["hello world, the quick brown fox jumps over the lazy dog"] * 20, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    cfg = {"bos_token": "<s>", "eos_token": {"content": "</s>", "special": True}, "pad_token": "<pad>"}
    if with_template_in_config:
        cfg["chat_template"] = TEMPLATE
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    return path


def test_byte_tokenizer_round_trips_utf8():
    tok = ByteTokenizer(eos_token_id=2)
    text = "héllo, wörld ✓"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8")) and max(ids) < 256
    assert tok.decode(ids) == text
    assert tok.eos_token_id == 2


def test_byte_tokenizer_decodes_cut_characters_and_large_ids_without_error():
    tok = ByteTokenizer()
    assert tok.decode(list("✓".encode())[:2]) == "\ufffd"
    assert tok.decode([104, 300, 105]) == "h\ufffdi"


def test_byte_tokenizer_has_no_chat_template():
    with pytest.raises(InputError, match="chat template"):
        ByteTokenizer().apply_chat_template(MESSAGES)


def test_tokenizer_json_encode_decode_and_special_tokens(tmp_path):
    tok = load_tokenizer(build_tokenizer_json(tmp_path))
    assert isinstance(tok, HFTokenizer)
    ids = tok.encode("hello world")
    assert ids[0] == 1 and tok.bos_token_id == 1  # post-processor adds <s>
    assert tok.eos_token_id == 2  # from {"content": "</s>"}
    assert tok.decode(ids) == "hello world"  # specials skipped
    assert tok.encode("hello world", add_special_tokens=False) == ids[1:]


def test_chat_template_from_tokenizer_config(tmp_path):
    tok = load_tokenizer(build_tokenizer_json(tmp_path))
    text = tok.apply_chat_template(MESSAGES)
    assert text == "<s><|system|>\nBe brief.</s>\n<|user|>\nhello world</s>\n<|assistant|>\n"
    assert not tok.apply_chat_template(MESSAGES, add_generation_prompt=False).endswith("<|assistant|>\n")


def test_chat_template_jinja_file_wins_and_matches_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer

    src = build_tokenizer_json(tmp_path / "src", with_template_in_config=False)
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_file(str(src / "tokenizer.json")),
                                              bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    hf.chat_template = TEMPLATE
    hf.save_pretrained(tmp_path / "hf")  # transformers 5 writes chat_template.jinja
    ours = load_tokenizer(tmp_path / "hf")
    assert ours.apply_chat_template(MESSAGES) == hf.apply_chat_template(MESSAGES, tokenize=False,
                                                                        add_generation_prompt=True)
    assert ours.encode("the lazy dog") == hf.encode("the lazy dog")


def test_template_raise_exception_is_an_input_error(tmp_path):
    path = build_tokenizer_json(tmp_path)
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}"
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match="user first"):
        load_tokenizer(path).apply_chat_template(MESSAGES)


def test_missing_template_is_an_input_error(tmp_path):
    tok = load_tokenizer(build_tokenizer_json(tmp_path, with_template_in_config=False))
    with pytest.raises(InputError, match="no chat template"):
        tok.apply_chat_template(MESSAGES)


def test_directory_without_tokenizer_json_falls_back_to_bytes(tmp_path):
    cfg = JambaConfig.from_preset("small-hybrid")
    tok = load_tokenizer(tmp_path, cfg)
    assert isinstance(tok, ByteTokenizer) and tok.eos_token_id == cfg.eos_token_id
    assert isinstance(load_tokenizer(None), ByteTokenizer)


def test_corrupt_tokenizer_json_is_a_checkpoint_error(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        load_tokenizer(tmp_path)
