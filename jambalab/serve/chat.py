"""Chat messages -> prompt token ids, with the checkpoint's chat template.

The template comes from (first that exists): the server's --chat-template file; the checkpoint's
tokenizer (chat_template.jinja or tokenizer_config.json "chat_template"); for jambalab's byte
tokenizer, DEFAULT_TEMPLATE below. It is rendered in jinja2's sandbox as transformers does
(jambalab.tokenizer.render_chat_template), with add_generation_prompt=True, and the result is
encoded without adding special tokens (templates write their own BOS).

DEFAULT_TEMPLATE writes each message as a role tag line and the content, then opens the
assistant's turn:

    <|system|>
    You are terse.
    <|user|>
    Hi!
    <|assistant|>

"""

from __future__ import annotations

from pathlib import Path

from jambalab.errors import InputError
from jambalab.tokenizer import ByteTokenizer, render_chat_template

DEFAULT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


class ChatFormatter:
    def __init__(self, tok, template: str | None) -> None:
        self.tok = tok
        self.template = template
        self.special = getattr(tok, "special", {})  # bos_token, eos_token, ... as the template sees them

    @classmethod
    def for_tokenizer(cls, tok, template_file: str | Path | None = None) -> ChatFormatter:
        if template_file is not None:
            try:
                template = Path(template_file).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise InputError(f"chat template file {template_file} cannot be read: {e}") from None
        elif isinstance(tok, ByteTokenizer):
            template = DEFAULT_TEMPLATE
        else:
            template = getattr(tok, "chat_template", None)
        return cls(tok, template)

    def render(self, messages: list[dict[str, str]]) -> str:
        if self.template is None:
            raise InputError("this model's tokenizer has no chat template "
                             "(start the server with --chat-template FILE, or use /v1/completions)")
        return render_chat_template(self.template, messages, True, self.special)

    def encode(self, messages: list[dict[str, str]]) -> list[int]:
        return self.tok.encode(self.render(messages), add_special_tokens=False)
