"""Training data: sources -> byte tokens -> memory-mapped shards -> seeded windows."""

import json
import math
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from jambalab.errors import InputError
from jambalab.tokenizer import ByteTokenizer
from jambalab.train import data as D

EOS = 2


def _prepare(src, out, **kw):
    logs = []
    meta = D.prepare_corpus(src, out, ByteTokenizer(eos_token_id=EOS), seed=0, log=logs.append, **kw)
    return meta, logs


def _stream_bytes(out) -> bytes:
    s = D.TokenStream.open(out)
    return bytes(s.read(0, len(s)).tolist())


def test_directory_becomes_one_stream_of_bytes_with_eos_between_documents(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("alpha")
    (src / "sub" / "b.py").write_text("beta\n")
    (src / ".hidden").write_text("never")
    meta, logs = _prepare(src, tmp_path / "out")
    assert meta["n_documents"] == 2 and meta["n_tokens"] == len("alpha") + len("beta\n") + 2
    stream = _stream_bytes(tmp_path / "out")
    assert sorted(stream.split(bytes([EOS]))[:2]) == [b"alpha", b"beta\n"]
    assert b"never" not in stream
    # prepared once: a second call reuses the shards without tokenizing
    _, logs2 = _prepare(src, tmp_path / "out")
    assert any("tokenizing" in m for m in logs) and not any("tokenizing" in m for m in logs2)


def test_jsonl_records_are_documents_and_bad_lines_are_named(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"body": "two", "text": "zwei"}) + "\n")
    meta, _ = _prepare(f, tmp_path / "out")
    assert meta["n_documents"] == 2
    assert set(_stream_bytes(tmp_path / "out").split(bytes([EOS]))) == {b"one", b"zwei", b""}
    f2 = tmp_path / "e.jsonl"
    f2.write_text(json.dumps({"body": "two"}) + "\n")
    assert _prepare(f2, tmp_path / "out2", text_field="body")[0]["n_documents"] == 1
    f.write_text(json.dumps({"text": "ok"}) + "\nnot json\n")
    with pytest.raises(InputError, match=r"d\.jsonl:2 is not valid JSON"):
        _prepare(f, tmp_path / "out3")


def test_jsonl_missing_field_is_an_error(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"content": "x"}) + "\n")
    with pytest.raises(InputError, match=r"d\.jsonl:1 has no string field 'text'"):
        _prepare(f, tmp_path / "out")


def test_non_utf8_files_are_skipped_with_one_counted_warning(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "good.txt").write_text("hello world")
    (src / "bad1.bin").write_bytes(b"\xff\xfe\x00bad")
    (src / "bad2.bin").write_bytes(b"ok \xc3\x28 broken")
    meta, logs = _prepare(src, tmp_path / "out")
    assert meta["n_skipped"] == 2 and meta["n_documents"] == 1
    warnings = [m for m in logs if "not UTF-8" in m]
    assert warnings == ["warning: skipped 2 of 3 file(s) that are not UTF-8 text"]


@pytest.mark.parametrize("case", ["missing", "empty_dir", "only_binary", "empty_file"])
def test_sources_without_text_are_clear_errors(tmp_path, case):
    src = tmp_path / "src"
    if case == "empty_dir":
        src.mkdir()
    elif case == "only_binary":
        src.mkdir()
        (src / "x.bin").write_bytes(b"\xff\xff")
    elif case == "empty_file":
        src = tmp_path / "empty.txt"
        src.write_text("")
    with pytest.raises(InputError, match="does not exist|holds no files|holds no text"):
        _prepare(src, tmp_path / "out")


def test_stdlib_corpus_is_found_through_sysconfig():
    docs = D.find_documents(D.STDLIB)
    root = Path(sysconfig.get_paths()["stdlib"])
    assert len(docs) > 100
    assert all(d.path.suffix == ".py" and root in d.path.parents for d in docs)
    assert not any("site-packages" in d.path.relative_to(root).parts for d in docs)
    assert any(d.path.name == "os.py" for d in docs)


def test_shards_roll_over_and_read_across_boundaries(tmp_path):
    w = D._ShardWriter(tmp_path, np.dtype(np.uint8), shard_tokens=7)
    w.write(np.arange(20))
    w.close()
    assert w.sizes == [7, 7, 6]
    stream = D.TokenStream([np.fromfile(tmp_path / f"shard-{i:05d}.bin", dtype=np.uint8) for i in range(3)], {})
    assert stream.read(5, 16).tolist() == list(range(5, 16))
    assert len(stream) == 20


def _text_data(tmp_path, n_bytes=4000, seq_len=16, seed=0, val_fraction=0.1):
    f = tmp_path / "t.txt"
    f.write_bytes(bytes(np.random.default_rng(0).integers(97, 123, n_bytes, dtype=np.uint8)))
    D.prepare_corpus(f, tmp_path / "out", ByteTokenizer(), seed=0, log=lambda m: None)
    return D.TextData(D.TokenStream.open(tmp_path / "out"), seq_len, seed, val_fraction)


def test_window_order_is_a_seeded_permutation_per_epoch(tmp_path):
    data = _text_data(tmp_path)
    n = data.n_train
    epoch0 = [data._window_index(p) for p in range(n)]
    epoch1 = [data._window_index(p) for p in range(n, 2 * n)]
    assert sorted(epoch0) == list(range(n)) and sorted(epoch1) == list(range(n)) and epoch0 != epoch1
    again = D.TextData(data.stream, 16, 0, 0.1)
    assert [again._window_index(p) for p in range(n)] == epoch0  # a pure function of (seed, position)
    other = D.TextData(data.stream, 16, 1, 0.1)
    assert [other._window_index(p) for p in range(n)] != epoch0
    ids, labels = data.train_batch(range(3, 7))
    assert ids.shape == (4, 16) and (ids == labels).all()


def test_validation_is_the_held_out_tail(tmp_path):
    data = _text_data(tmp_path, val_fraction=0.1)
    assert data.split == 4000 - 400 and data.n_val == 400 // 16
    tail = data.stream.read(data.split, len(data.stream))
    for ids, _ in data.val_batches(2, 4):
        for row in ids.numpy():
            hits = [i for i in range(len(tail) - 15) if (tail[i:i + 16] == row).all()]
            assert hits
    # the same windows at every evaluation
    a, b = data.val_batches(2, 4), data.val_batches(2, 4)
    assert all((x[0] == y[0]).all() for x, y in zip(a, b))


def test_seq_len_longer_than_the_data_is_a_clear_error(tmp_path):
    with pytest.raises(InputError, match="too few for one 4096-token training window"):
        _text_data(tmp_path, n_bytes=3000, seq_len=4096)


def test_unigram_entropy(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("ab" * 1000)
    D.prepare_corpus(f, tmp_path / "out", ByteTokenizer(), seed=0, log=lambda m: None)
    data = D.TextData(D.TokenStream.open(tmp_path / "out"), 8, 0, 0.01)
    assert data.unigram_entropy(256) == pytest.approx(math.log(2), abs=1e-3)
