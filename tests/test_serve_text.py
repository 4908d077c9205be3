"""The HTTP server's pure parts: streaming detokenization, stop strings, chat templates, request
validation and its error objects. No engine, no sockets."""

import random

import pytest
from pydantic import ValidationError

pytest.importorskip("fastapi")

from jambalab.serve import protocol as P  # noqa: E402
from jambalab.serve.chat import DEFAULT_TEMPLATE, ChatFormatter  # noqa: E402
from jambalab.serve.http import validation_error  # noqa: E402
from jambalab.serve.textstream import ByteDetokenizer, Detokenizer, StopMatcher, TextStream  # noqa: E402
from jambalab.tokenizer import ByteTokenizer, HFTokenizer  # noqa: E402
from test_tokenizer import build_tokenizer_json  # noqa: E402


def _stream(detok, ids):
    parts = [detok.add(i) for i in ids]
    return parts, "".join(parts) + detok.flush()


def test_byte_stream_equals_one_shot_decode_and_never_splits_a_character():
    tok, rng = ByteTokenizer(), random.Random(0)
    alphabet = [*range(256), 300, 511, *"é€😀".encode()]
    for _ in range(300):  # arbitrary ids, valid or not: the same text as decoding all at once
        ids = [rng.choice(alphabet) for _ in range(rng.randrange(40))]
        assert _stream(ByteDetokenizer(), ids)[1] == tok.decode(ids)
    text = "a€b😀ü"
    parts, whole = _stream(ByteDetokenizer(), list(text.encode()))
    assert whole == text and "\ufffd" not in "".join(parts)
    assert parts[:4] == ["a", "", "", "€"]  # the euro sign's three bytes wait for the last one


def test_invalid_bytes_do_not_stall_the_byte_stream():
    parts, _ = _stream(ByteDetokenizer(), [0xFF, 400, ord("x")])
    assert parts == ["\ufffd", "\ufffd", "x"]


def test_bpe_stream_equals_decode_and_keeps_the_first_space(tmp_path):
    tok = HFTokenizer.from_dir(build_tokenizer_json(tmp_path))
    prompt = tok.encode("the quick")
    ids = tok.encode(" brown fox héllo wörld ✓ über", add_special_tokens=False)
    parts, whole = _stream(Detokenizer(tok, prompt), ids)
    assert whole == tok.decode(ids) == " brown fox héllo wörld ✓ über"
    assert "\ufffd" not in "".join(parts)


def _feed_all(matcher, text, step):
    out, stopped = [], False
    for i in range(0, len(text), step):
        piece, stopped = matcher.feed(text[i:i + step])
        out.append(piece)
        if stopped:
            break
    return out, stopped


@pytest.mark.parametrize("step", [1, 2, 5])
def test_stop_string_is_cut_and_never_shown(step):
    parts, stopped = _feed_all(StopMatcher(["STOP", "\n\n"]), "abc ST xy STOP tail", step)
    assert stopped and "".join(parts) == "abc ST xy "
    assert not any("STOP" in p or p.endswith("S") and i < len(parts) - 1 for i, p in enumerate(parts[:-1]))


def test_held_text_that_is_not_a_stop_string_is_released():
    m = StopMatcher(["END"])
    assert m.feed("abc E") == ("abc ", False)
    assert m.feed("N") == ("", False)
    assert m.feed("x") == ("ENx", False)
    assert m.feed("EN") == ("", False) and m.flush() == "EN"


def test_the_stop_string_completed_first_wins():
    assert StopMatcher(["cd", "bcx"]).feed("abcd") == ("ab", True)
    assert StopMatcher(["b", "abc"]).feed("xabc") == ("xa", True)  # as if the text came char by char
    assert StopMatcher(["bc", "abc"]).feed("xabc") == ("x", True)


def test_text_stream_holds_a_stop_string_cut_inside_a_character():
    ts, out = TextStream(ByteTokenizer(), [], ["€!"]), []
    for b in "x€€!y".encode():
        out.append(ts.add(b))
        if ts.stopped:
            break
    assert ts.stopped and "".join(out) == "x€" and out[-1] == ""


def test_text_stream_finish_releases_held_text():
    ts = TextStream(ByteTokenizer(), [], ["zz"])
    out = "".join(ts.add(b) for b in "abz".encode())
    assert out == "ab" and ts.finish() == "z" and not ts.stopped


def test_default_chat_template_for_the_byte_tokenizer():
    fmt = ChatFormatter.for_tokenizer(ByteTokenizer())
    assert fmt.template == DEFAULT_TEMPLATE
    msgs = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"}]
    assert fmt.render(msgs) == "<|system|>\nBe terse.\n<|user|>\nHi\n<|assistant|>\n"
    assert fmt.encode(msgs) == list(fmt.render(msgs).encode())


def test_checkpoint_template_and_override_file(tmp_path):
    tok = HFTokenizer.from_dir(build_tokenizer_json(tmp_path / "ckpt"))
    msgs = [{"role": "user", "content": "hello"}]
    assert ChatFormatter.for_tokenizer(tok).render(msgs) == tok.apply_chat_template(msgs)
    (tmp_path / "t.jinja").write_text("{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    assert ChatFormatter.for_tokenizer(tok, tmp_path / "t.jinja").render(msgs) == "[hello]"


def _error(model, body):
    with pytest.raises(ValidationError) as e:
        model.model_validate(body)
    return validation_error(e.value.errors())


@pytest.mark.parametrize("body, param", [
    ({"prompt": "x", "temperature": -0.5}, "temperature"),
    ({"prompt": "x", "top_p": 1.5}, "top_p"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "n": 2}, "n"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "max_tokens": "5"}, "max_tokens"),  # strict: no string -> int coercion
    ({"prompt": "x", "stream": 1}, "stream"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [1, "a"]}, "prompt"),
    ({"prompt": ["a", "b"]}, "prompt"),
    ({"prompt": 7}, "prompt"),
    ({}, "prompt"),
    ({"prompt": "x", "stop": ["a", 3]}, "stop"),
    ({"prompt": "x", "logprobs": 21}, "logprobs"),
    ({"prompt": "x", "echo": True, "logprobs": 1}, "logprobs"),
    ({"prompt": "x", "frequency_penalty": 0.5}, "frequency_penalty"),
])
def test_bad_completion_fields_are_named(body, param):
    err = _error(P.CompletionRequest, body)
    assert err.status == 400 and err.param == param and err.message.startswith(param + ":")


@pytest.mark.parametrize("body, param", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "tools"),
])
def test_bad_chat_fields_are_named(body, param):
    assert _error(P.ChatCompletionRequest, body).param == param


def test_requests_accept_what_openai_clients_send():
    r = P.CompletionRequest.model_validate({"model": "m", "prompt": ["one prompt"], "max_tokens": 3, "top_k": -1,
                                            "stop": "x", "temperature": 0, "unknown_field": 1})
    assert r.prompt == "one prompt" and r.stop_strings() == ["x"] and r.top_k == -1
    assert P.CompletionRequest.model_validate({"prompt": [[5, 6]]}).prompt == [5, 6]
    c = P.ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}], "max_completion_tokens": 4})
    assert c.messages[0].text() == "ab" and c.token_limit() == 4 and c.n_logprobs() is None


def test_invalid_json_has_no_param():
    err = validation_error([{"type": "json_invalid", "loc": ("body", 3), "msg": "JSON decode error",
                             "ctx": {"error": "Expecting value"}}])
    assert err.status == 400 and err.param is None and "not valid JSON" in err.message
