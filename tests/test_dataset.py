"""Calibration data loading: record shapes, rendering, truncation, errors, batching."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from streamq.calib.dataset import Batch, load_text_dataset, make_batches, random_token_samples
from streamq.errors import DatasetError
from streamq.testing.tiny_models import BOS_ID, CALIB_FILE, tiny_tokenizer

CHAT = [
    {"role": "system", "content": "You explain things."},
    {"role": "user", "content": "What is a heap?"},
    {"role": "assistant", "content": "A tree where each parent is smaller than its children."},
]
GOOD = {"text": "A perfectly ordinary line of calibration text."}


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def write_jsonl(path: Path, lines: list) -> Path:
    """Dicts are JSON-encoded; strings are written verbatim (to make broken lines)."""
    rendered = [line if isinstance(line, str) else json.dumps(line) for line in lines]
    path.write_text("\n".join(rendered) + "\n", encoding="utf-8")
    return path


def load(path: Path, tok, **kwargs) -> list[list[int]]:
    kwargs.setdefault("max_seq_length", 4096)
    kwargs.setdefault("num_samples", 100)
    return load_text_dataset(path, tok, **kwargs)


def chat_ids(tok, messages) -> list[int]:
    return tok.encode(tok.apply_chat_template(messages, tokenize=False), add_special_tokens=False)


def test_messages_use_chat_template_with_single_bos(tmp_path, tok):
    [ids] = load(write_jsonl(tmp_path / "d.jsonl", [{"messages": CHAT}]), tok)
    assert ids == chat_ids(tok, CHAT)
    assert tok.decode(ids).startswith("<|begin_of_text|><|im_start|>system\nYou explain things.<|im_end|>\n")
    assert ids.count(BOS_ID) == 1 and ids[0] == BOS_ID


def test_conversations_map_sharegpt_roles(tmp_path, tok):
    turns = [
        {"from": "system", "value": CHAT[0]["content"]},
        {"from": "human", "value": CHAT[1]["content"]},
        {"from": "gpt", "value": CHAT[2]["content"]},
    ]
    [ids] = load(write_jsonl(tmp_path / "d.jsonl", [{"conversations": turns}]), tok)
    assert ids == chat_ids(tok, CHAT)


def test_input_output_becomes_user_assistant_chat(tmp_path, tok):
    record = {"input": CHAT[1]["content"], "output": CHAT[2]["content"]}
    [ids] = load(write_jsonl(tmp_path / "d.jsonl", [record]), tok)
    assert ids == chat_ids(tok, CHAT[1:])


def test_text_is_used_as_is_with_bos(tmp_path, tok):
    [ids] = load(write_jsonl(tmp_path / "d.jsonl", [GOOD]), tok)
    assert ids == tok.encode(GOOD["text"], add_special_tokens=True)
    assert tok.decode(ids) == "<|begin_of_text|>" + GOOD["text"]


def test_without_chat_template_roles_are_concatenated(tmp_path, tok):
    plain = tiny_tokenizer()
    plain.chat_template = None
    [ids] = load(write_jsonl(tmp_path / "d.jsonl", [{"messages": CHAT[1:]}]), plain)
    expected = f"user: {CHAT[1]['content']}\nassistant: {CHAT[2]['content']}\n"
    assert tok.decode(ids, skip_special_tokens=True) == expected
    assert ids[0] == BOS_ID


def test_truncation_keeps_the_prefix(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": CHAT}, GOOD])
    full = load(path, tok)
    cut = load(path, tok, max_seq_length=7)
    assert [len(ids) for ids in cut] == [7, 7]
    assert cut == [ids[:7] for ids in full]


def test_num_samples_stops_reading_before_later_lines(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, GOOD, GOOD, "not json"])
    assert len(load(path, tok, num_samples=3)) == 3
    assert len(load(path, tok, num_samples=2)) == 2


def test_fewer_records_than_requested_warns(tmp_path, tok, caplog):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, GOOD])
    with caplog.at_level(logging.WARNING, logger="streamq"):
        assert len(load(path, tok, num_samples=5)) == 2
    assert "only 2 usable records, 5 requested" in caplog.text


@pytest.mark.parametrize(
    "bad_line, reason",
    [
        ("", "empty line"),
        ("   ", "empty line"),
        ('{"text": "unterminated', "invalid JSON"),
        ('["a", "list"]', "not an object"),
        ('{"prompt": "x"}', "record has keys ['prompt']"),
        ('{"input": "only input"}', "record has keys ['input']"),
        ('{"text": 42}', '"text" must be a string'),
        ('{"text": "  "}', "no text"),
        ('{"messages": []}', "non-empty list"),
        ('{"messages": [{"role": "robot", "content": "x"}]}', 'messages[0] needs a "role"'),
        ('{"conversations": [{"from": "bot", "value": "x"}]}', 'conversations[0] needs a "from"'),
        ('{"conversations": [{"from": "gpt"}]}', "conversations[0].value must be a string"),
    ],
)
def test_bad_line_names_file_and_line(tmp_path, tok, bad_line, reason):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, GOOD, bad_line, GOOD])
    with pytest.raises(DatasetError) as err:
        load(path, tok)
    assert f"{path}:3:" in str(err.value)
    assert reason in str(err.value)


def test_skip_bad_lines_counts_and_warns_once(tmp_path, tok, caplog):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, "", "{oops", GOOD, {"foo": 1}])
    with caplog.at_level(logging.WARNING, logger="streamq"):
        samples = load(path, tok, num_samples=2, skip_bad_lines=True)
    assert len(samples) == 2
    skip_warnings = [r for r in caplog.records if "skipped" in r.getMessage()]
    assert len(skip_warnings) == 1
    assert "skipped 2 bad line(s)" in skip_warnings[0].getMessage()


def test_missing_file_names_path(tmp_path, tok):
    path = tmp_path / "nope.jsonl"
    with pytest.raises(DatasetError, match="not found: .*nope.jsonl"):
        load(path, tok)


def test_zero_usable_records_is_an_error(tmp_path, tok):
    path = write_jsonl(tmp_path / "d.jsonl", ["{bad", '{"x": 1}'])
    with pytest.raises(DatasetError, match="no usable calibration records"):
        load(path, tok, skip_bad_lines=True)


def test_shipped_calibration_file(tok):
    records = [json.loads(line) for line in CALIB_FILE.read_text(encoding="utf-8").splitlines()]
    shapes = {"input" if "input" in r else next(iter(r)) for r in records}
    assert shapes == {"messages", "conversations", "input", "text"}
    assert 60 <= len(records) <= 120 and CALIB_FILE.stat().st_size < 150_000
    lengths = [len(ids) for ids in load(CALIB_FILE, tok, num_samples=len(records))]
    assert len(lengths) == len(records)
    assert min(lengths) < 100 and max(lengths) > 500


def test_make_batches_pads_right_and_masks():
    samples = [[5, 6, 7], [8], [9, 10], [11, 12, 13, 14], [15]]
    batches = make_batches(samples, batch_size=2, pad_id=1)
    assert [b.input_ids.shape for b in batches] == [(2, 3), (2, 4), (1, 1)]
    first = batches[0]
    assert isinstance(first, Batch)
    assert first.input_ids.tolist() == [[5, 6, 7], [8, 1, 1]]
    assert first.attention_mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batches[1].input_ids.tolist() == [[9, 10, 1, 1], [11, 12, 13, 14]]
    assert batches[1].attention_mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    for b in batches:
        assert b.input_ids.dtype == b.attention_mask.dtype == torch.long


def test_make_batches_keeps_order_and_round_trips():
    samples = random_token_samples(512, 7, 1, seed=0)
    samples = [s * (i % 4 + 1) for i, s in enumerate(samples)]
    rows = [
        ids[mask.bool()].tolist()
        for b in make_batches(samples, batch_size=3, pad_id=0)
        for ids, mask in zip(b.input_ids, b.attention_mask, strict=True)
    ]
    assert rows == samples


def test_random_token_samples_are_seeded():
    a = random_token_samples(100, 4, 9, seed=1)
    assert len(a) == 4 and all(len(s) == 9 for s in a)
    assert all(0 <= t < 100 for s in a for t in s)
    assert a == random_token_samples(100, 4, 9, seed=1)
    assert a != random_token_samples(100, 4, 9, seed=2)


def test_invalid_utf8_line_is_a_bad_line(tmp_path, tok, caplog):
    path = tmp_path / "calib.jsonl"
    good = json.dumps({"text": "hello world"}).encode()
    path.write_bytes(good + b"\n" + b'{"text": "caf\xe9"}\n' + good + b"\n")
    with pytest.raises(DatasetError, match=r"calib\.jsonl:2: not valid UTF-8"):
        load_text_dataset(path, tok, max_seq_length=16, num_samples=3)
    with caplog.at_level(logging.WARNING, logger="streamq"):
        samples = load_text_dataset(path, tok, max_seq_length=16, num_samples=3, skip_bad_lines=True)
    assert len(samples) == 2 and "skipped 1 bad line" in caplog.text


def test_reads_only_the_records_it_needs(tmp_path, tok):
    """A large file of which a few records are needed is read lazily: bytes after them never
    matter (here they are not even text)."""
    path = tmp_path / "big.jsonl"
    with path.open("wb") as f:
        for _ in range(4):
            f.write(json.dumps({"text": "a record"}).encode() + b"\n")
        f.write(b"\xff" * (8 << 20))  # 8 MiB of garbage after the 4 needed records
    import tracemalloc

    tracemalloc.start()
    samples = load_text_dataset(path, tok, max_seq_length=8, num_samples=4)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(samples) == 4
    assert peak < 2 << 20, peak  # far below the file's 8 MiB
