"""Tokenizers behind one small interface: encode(text) -> ids, decode(ids) -> text, eos_token_id.

- HFTokenizer: a checkpoint directory's tokenizer.json (the `tokenizers` library) and its chat
  template (tokenizer_config.json "chat_template", or chat_template.jinja as transformers 5
  writes it), rendered with jinja2 in a sandbox as transformers does.
- ByteTokenizer: ids 0..255 are the UTF-8 bytes of the text; for models jambalab trains itself.

load_tokenizer(dir, config) picks the first when the directory has a tokenizer.json.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

from jambalab.errors import CheckpointError, InputError

Message = dict[str, Any]  # {"role": "user", "content": "..."}


class Tokenizer(Protocol):
    eos_token_id: int | None
    vocab_size: int

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def apply_chat_template(self, messages: list[Message], add_generation_prompt: bool = True) -> str: ...


# ---------------------------------------------------------------------------------------
# Bytes
# ---------------------------------------------------------------------------------------
class ByteTokenizer:
    """ids 0..255 = bytes. Ids >= 256 (a model with a larger vocabulary) decode to U+FFFD."""

    vocab_size = 256

    def __init__(self, eos_token_id: int | None = None):
        self.eos_token_id = eos_token_id

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(text.encode("utf-8"))  # bytes have no special tokens to add

    def decode(self, ids: list[int]) -> str:
        # Invalid UTF-8 (a cut multi-byte character, random ids) becomes U+FFFD rather than an error.
        data = bytes(i if 0 <= i < 256 else 0xFF for i in ids)
        return data.decode("utf-8", errors="replace")

    def apply_chat_template(self, messages: list[Message], add_generation_prompt: bool = True) -> str:
        raise InputError("the byte-level tokenizer has no chat template (--chat needs a checkpoint that ships one)")


# ---------------------------------------------------------------------------------------
# tokenizer.json (+ chat template)
# ---------------------------------------------------------------------------------------
class HFTokenizer:
    """A `tokenizers.Tokenizer` plus the special tokens and chat template of tokenizer_config.json."""

    def __init__(self, tokenizer, special: dict[str, str | None], chat_template: str | None):
        self.tok = tokenizer
        self.special = special  # bos_token, eos_token, ... as strings (what templates see)
        self.chat_template = chat_template
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.eos_token_id = self._id(special.get("eos_token"))
        self.bos_token_id = self._id(special.get("bos_token"))

    @classmethod
    def from_dir(cls, path: str | Path) -> HFTokenizer:
        from tokenizers import Tokenizer as _Tok

        path = Path(path)
        try:
            tok = _Tok.from_file(str(path / "tokenizer.json"))
        except Exception as e:  # the tokenizers library raises a bare Exception on bad JSON
            raise CheckpointError(f"{path / 'tokenizer.json'} cannot be read: {e}") from None
        cfg = _read_json(path / "tokenizer_config.json")
        special = {k: _token_text(cfg.get(k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
        return cls(tok, special, _chat_template(path, cfg))

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self.tok.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def apply_chat_template(self, messages: list[Message], add_generation_prompt: bool = True) -> str:
        """The rendered conversation. Encode it with add_special_tokens=False: templates write BOS themselves."""
        if self.chat_template is None:
            raise InputError("this checkpoint's tokenizer has no chat template")
        return render_chat_template(self.chat_template, messages, add_generation_prompt, self.special)


def render_chat_template(template: str, messages: list[Message], add_generation_prompt: bool,
                         special: dict[str, str | None]) -> str:
    """Render with the environment transformers uses (sandboxed, trim_blocks, lstrip_blocks)."""
    try:
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise InputError("chat templates need jinja2 (pip install jinja2)") from None

    def raise_exception(message: str):
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    try:
        return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                **{k: v for k, v in special.items() if v is not None})
    except jinja2.exceptions.TemplateError as e:
        raise InputError(f"chat template failed: {e}") from None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    return d if isinstance(d, dict) else {}


def _token_text(v: Any) -> str | None:
    # tokenizer_config.json writes a special token as a string or as {"content": "...", ...}
    return v.get("content") if isinstance(v, dict) else v


def _chat_template(path: Path, cfg: dict[str, Any]) -> str | None:
    jinja_file = path / "chat_template.jinja"  # transformers 5 saves the template here
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    t = cfg.get("chat_template")
    if isinstance(t, list):  # named templates: [{"name": "default", "template": "..."}, ...]
        named = {d.get("name"): d.get("template") for d in t if isinstance(d, dict)}
        return named.get("default") or next(iter(named.values()), None)
    return t


# ---------------------------------------------------------------------------------------
# Choice
# ---------------------------------------------------------------------------------------
def load_tokenizer(path: str | Path | None, config=None) -> HFTokenizer | ByteTokenizer:
    """The directory's tokenizer.json if it has one, else bytes (EOS from the model config)."""
    eos = None if config is None else config.eos_token_id
    if path is not None and (Path(path) / "tokenizer.json").is_file():
        tok = HFTokenizer.from_dir(path)
        if tok.eos_token_id is None:
            tok.eos_token_id = eos
        return tok
    return ByteTokenizer(eos_token_id=eos)
