"""Synthetic recall tasks: layout, answers-only labels, determinism, accuracy."""

import pytest
import torch

import jambalab
from jambalab.errors import InputError
from jambalab.train.tasks import (FIRST_ID, IGNORE, SEP, TRAIN, VAL, MQAR, FirstAnswer, Needle, answer_accuracy,
                                  evaluate, make_task)

NAMES = ["mqar", "passkey", "copy", "needle"]


@pytest.mark.parametrize("name", NAMES)
def test_batches_are_seeded_and_label_only_answers(name):
    task = make_task(name)
    ids, labels = task.batch(seq_len=160, batch_size=4, seed=3)
    assert ids.shape == labels.shape == (4, 160) and ids.dtype == labels.dtype == torch.long
    assert 0 <= int(ids.min()) and int(ids.max()) < 256
    answers = labels != IGNORE
    assert answers.any(1).all() and (labels[answers] == ids[answers]).all()  # labels copy the answer tokens
    again = task.batch(seq_len=160, batch_size=4, seed=3)
    assert torch.equal(again[0], ids) and torch.equal(again[1], labels)
    assert not torch.equal(task.batch(seq_len=160, batch_size=4, seed=4)[0], ids)
    assert not torch.equal(task.batch(160, 4, seed=3, split=VAL)[0], ids)  # held-out stream
    # sample i does not depend on the batch it is drawn in (processes split batches freely)
    part = task.batch_at(range(2, 4), 160, 3, TRAIN)
    assert torch.equal(part[0], ids[2:])


def test_mqar_answers_are_the_values_bound_to_the_queried_keys():
    task = MQAR(n_pairs=6, n_queries=4)
    ids, labels = task.batch(seq_len=64, batch_size=8, seed=0)
    for row, lab in zip(ids.tolist(), labels.tolist()):
        kv = dict(zip(row[0:12:2], row[1:12:2]))
        answers = [t for t, l in enumerate(lab) if l != IGNORE]
        assert len(answers) == 4 and all(t >= 12 for t in answers)
        for t in answers:
            assert lab[t] == kv[row[t - 1]]  # the token before the answer is its key


def test_selective_copy_answers_are_the_scattered_tokens_in_order():
    task = make_task("copy", n_tokens=5)
    ids, labels = task.batch(seq_len=40, batch_size=3, seed=1)
    for row, lab in zip(ids.tolist(), labels.tolist()):
        sep = row.index(SEP)
        data = [t for t in row[:sep] if t != 0]
        assert sep == 40 - 5 - 1 and row[sep + 1:] == data and lab[sep + 1:] == data


def test_passkey_hides_the_key_and_asks_for_it():
    task = make_task("passkey", n_digits=5, depth=0.5)
    ids, labels = task.batch(seq_len=300, batch_size=2, seed=0)
    for row, lab in zip(ids.tolist(), labels.tolist()):
        text = bytes(row).decode()
        key = bytes(l for l in lab if l != IGNORE).decode()
        assert len(key) == 5 and key.isdigit()
        assert text.endswith("What is the pass key? The pass key is " + key)
        assert f"The pass key is {key}. Remember it." in text[:-60]


def test_accuracy_counts_only_answers():
    labels = torch.full((2, 6), IGNORE)
    labels[0, 3], labels[1, 5] = 7, 9
    logits = torch.zeros(2, 6, 16)
    logits[0, 2, 7] = 1.0  # right: position 2 predicts token 3
    logits[1, 4, 8] = 1.0  # wrong
    assert answer_accuracy(logits, labels) == 0.5
    with pytest.raises(InputError, match="no answer positions"):
        answer_accuracy(logits, torch.full((2, 6), IGNORE))


@pytest.mark.parametrize("name,kw,seq_len,vocab,msg", [
    ("mqar", {"n_pairs": 8}, 20, 256, "need seq_len >= 32"),
    ("mqar", {}, 64, 128, "vocabulary has 128"),
    ("mqar", {"n_pairs": 4, "n_queries": 5}, 64, 256, "n_queries=5"),
    ("passkey", {}, 50, 256, "seq_len must be >="),
    ("passkey", {"depth": 2.0}, 300, 256, "depth"),
    ("copy", {"n_tokens": 16}, 20, 256, "seq_len must be >= 33"),
])
def test_impossible_settings_are_clear_errors(name, kw, seq_len, vocab, msg):
    with pytest.raises(InputError, match=msg):
        make_task(name, **kw).check(seq_len, vocab)


def test_unknown_task_or_option():
    with pytest.raises(InputError, match="unknown task"):
        make_task("sorting")
    with pytest.raises(InputError, match="task mqar"):
        make_task("mqar", n_keys=3)


def test_evaluate_gives_an_accuracy_in_unit_interval():
    model = jambalab.from_preset("tiny-hybrid", vocab_size=256)
    acc = evaluate(model, make_task("mqar", n_pairs=4), seq_len=32, n_samples=6, batch_size=4)
    assert 0.0 <= acc <= 1.0 and model.training


# ---- the key-value needle ---------------------------------------------------------------------
def _haystack_pairs(task, row):
    """{key: (position, value)} of the key-value pairs before SEP."""
    hay = task.haystack_len(len(row))
    first_key = FIRST_ID + task.n_filler
    return {t: (i, row[i + 1]) for i, t in enumerate(row[:hay]) if first_key <= t < first_key + task.n_keys}


@pytest.mark.parametrize("seq_len", [32, 64, 200, 512])
@pytest.mark.parametrize("depth", [0.0, 0.3, 0.5, 1.0])
def test_needle_sits_at_the_stated_depth_and_is_asked_first(seq_len, depth):
    task = Needle(n_keys=32, depth=depth)
    ids, labels = task.batch(seq_len, batch_size=6, seed=2)
    at = task.needle_at(seq_len, depth)
    hay = task.haystack_len(seq_len)
    assert at == round(depth * (hay - 2))
    for row, lab in zip(ids.tolist(), labels.tolist()):
        pairs = _haystack_pairs(task, row)
        assert len(pairs) == seq_len // task.pair_every  # distinct keys, one pair per pair_every tokens
        assert row[hay] == SEP and row.count(SEP) == 1
        needle_key = row[hay + 1]  # the first key asked
        assert pairs[needle_key] == (at, row[at + 1])  # ... is the pair at the stated depth
        answers = [t for t, x in enumerate(lab) if x != IGNORE]
        assert answers == [hay + 2 + 2 * q for q in range(task.queries(seq_len))]
        asked = [row[t - 1] for t in answers]
        assert len(set(asked)) == len(asked) == max(1, len(pairs) // 2)  # half the pairs, each once
        for t in answers:  # every answer is the value bound to the key just asked
            assert lab[t] == row[t] == pairs[row[t - 1]][1]


def test_needle_is_deterministic_by_seed_and_varies_with_depth():
    a = Needle(depth=0.25).batch(128, 4, seed=7)
    assert all(torch.equal(x, y) for x, y in zip(a, Needle(depth=0.25).batch(128, 4, seed=7)))
    assert not torch.equal(a[0], Needle(depth=0.25).batch(128, 4, seed=8)[0])
    uniform = Needle().batch(128, 64, seed=0)[0]
    hay = Needle().haystack_len(128)
    starts = {row.tolist().index(int(row[hay + 1])) for row in uniform}
    assert len(starts) > 20  # depth None: the needle moves through the haystack


def test_first_answer_keeps_only_the_needles_answer():
    task = Needle(depth=0.5)
    ids, labels = task.batch(96, 3, seed=1)
    ids1, only = FirstAnswer(task).batch(96, 3, seed=1)
    assert torch.equal(ids, ids1)
    hay = task.haystack_len(96)
    assert ((only != IGNORE).sum(1) == 1).all()
    assert torch.equal(only[:, hay + 2], labels[:, hay + 2])


@pytest.mark.parametrize("kw,seq_len,msg", [
    ({"n_keys": 8}, 256, "more than the 8 distinct keys"),
    ({"depth": -0.1}, 64, "depth"),
    ({"n_queries": 0}, 64, "n_queries must be positive"),
    ({"n_queries": 5}, 64, "exceeds the 4 pairs"),
    ({"pair_every": 2}, 64, "too short"),
    ({"n_keys": 300}, 64, "vocabulary has 256"),
])
def test_needle_impossible_settings_are_clear_errors(kw, seq_len, msg):
    with pytest.raises(InputError, match=msg):
        Needle(**kw).check(seq_len, 256)
