"""Calibration text: JSONL records -> token id lists -> padded batches.

Calibration sets come in the shapes people already have on disk (chat `messages`,
ShareGPT `conversations`, instruction `input`/`output`, plain `text`), so all four are
read from one JSONL file. Chat shapes go through the model's own chat template, because
the activation statistics should come from the token patterns the model will serve.

Special tokens: text rendered by a chat template already contains the special tokens
the template wants (BOS included, when it has one), so it is tokenized with
`add_special_tokens=False`; plain text is tokenized with `add_special_tokens=True` so it
gets the BOS the model saw in pretraining. Either way a sample starts the way the model
expects, with no doubled BOS.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from streamq.errors import DatasetError

logger = logging.getLogger("streamq")

Message = dict[str, str]

_SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
_CHAT_ROLES = ("system", "user", "assistant")
_SHAPES_HELP = (
    'expected one of {"messages": [...]}, {"conversations": [...]}, {"input": ..., "output": ...}, {"text": ...}'
)


class _BadRecord(ValueError):
    """A record that cannot be used; the caller adds file and line to the message."""


@dataclass(frozen=True)
class Batch:
    """Right-padded token ids; `attention_mask` is 1 on real tokens, 0 on padding."""

    input_ids: torch.LongTensor
    attention_mask: torch.LongTensor


def _string(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise _BadRecord(f"{what} must be a string, got {type(value).__name__}")
    return value


def _chat_messages(turns: Any, key: str) -> list[Message]:
    """Validate a `messages` list (role/content) as-is."""
    if not isinstance(turns, list) or not turns:
        raise _BadRecord(f'"{key}" must be a non-empty list')
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or turn.get("role") not in _CHAT_ROLES:
            raise _BadRecord(f'{key}[{i}] needs a "role" in {list(_CHAT_ROLES)}')
        messages.append({"role": turn["role"], "content": _string(turn.get("content"), f"{key}[{i}].content")})
    return messages


def _sharegpt_messages(turns: Any, key: str) -> list[Message]:
    """Map ShareGPT `from`/`value` turns to chat messages (human->user, gpt->assistant)."""
    if not isinstance(turns, list) or not turns:
        raise _BadRecord(f'"{key}" must be a non-empty list')
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or turn.get("from") not in _SHAREGPT_ROLES:
            raise _BadRecord(f'{key}[{i}] needs a "from" in {list(_SHAREGPT_ROLES)}')
        messages.append(
            {
                "role": _SHAREGPT_ROLES[turn["from"]],
                "content": _string(turn.get("value"), f"{key}[{i}].value"),
            }
        )
    return messages


def _record_content(record: Any) -> str | list[Message]:
    if not isinstance(record, dict):
        raise _BadRecord(f"record is a JSON {type(record).__name__}, not an object; {_SHAPES_HELP}")
    if "messages" in record:
        return _chat_messages(record["messages"], "messages")
    if "conversations" in record:
        return _sharegpt_messages(record["conversations"], "conversations")
    if "input" in record and "output" in record:
        return [
            {"role": "user", "content": _string(record["input"], '"input"')},
            {"role": "assistant", "content": _string(record["output"], '"output"')},
        ]
    if "text" in record:
        return _string(record["text"], '"text"')
    raise _BadRecord(f"record has keys {sorted(record)}; {_SHAPES_HELP}")


def parse_record(record: Any) -> str | list[Message]:
    """Return plain text for `{"text"}` records, chat messages for every other shape.

    Single empty fields are allowed (an empty system prompt is real data), but a record
    with no text at all would only calibrate on template tokens, so it is rejected.
    """
    content = _record_content(record)
    texts = [content] if isinstance(content, str) else [m["content"] for m in content]
    if not any(t.strip() for t in texts):
        raise _BadRecord("record contains no text")
    return content


def render_and_tokenize(content: str | list[Message], tokenizer: Any, max_length: int) -> list[int]:
    """Token ids of one parsed record, at most `max_length` of them.

    The tokenizer truncates (rather than slicing afterwards) so over-long records never
    trigger its "longer than model_max_length" warning. See the module docstring for
    the special-token rule.
    """
    if isinstance(content, str):
        text, add_special = content, True
    elif getattr(tokenizer, "chat_template", None):
        text, add_special = tokenizer.apply_chat_template(content, tokenize=False), False
    else:
        text, add_special = "".join(f"{m['role']}: {m['content']}\n" for m in content), True
    return tokenizer.encode(text, add_special_tokens=add_special, truncation=True, max_length=max_length)


def _parse_line(line: str) -> str | list[Message]:
    if not line.strip():
        raise _BadRecord("empty line")
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise _BadRecord(f"invalid JSON ({err})") from None
    return parse_record(record)


def _read_lines(path: Path) -> Iterator[str | _BadRecord]:
    """The file's lines, read lazily (a 300 MB file of which 4 records are needed costs 4
    lines of memory). A line that is not valid UTF-8 comes back as a `_BadRecord`, a bad
    line like any other (named, or skipped and counted with skip_bad_lines)."""
    try:
        f = path.open("rb")
    except FileNotFoundError:
        # The absolute path tried: a relative data_path is taken from the current directory.
        raise DatasetError(f"dataset.data_path: calibration file not found: {path} (tried {path.absolute()}; "
                           "relative paths are taken from the current directory)") from None
    except OSError as err:
        raise DatasetError(f"cannot read calibration file {path}: {err}") from None
    with f:
        for raw in f:
            try:
                yield raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as err:
                yield _BadRecord(f"not valid UTF-8 ({err.reason} at byte {err.start})")


def load_text_dataset(
    path: str | Path,
    tokenizer: Any,
    *,
    max_seq_length: int,
    num_samples: int,
    skip_bad_lines: bool = False,
) -> list[list[int]]:
    """Read up to `num_samples` records from a JSONL file as token id lists.

    Each list is truncated to `max_seq_length`. A bad line (empty, invalid JSON, unknown
    shape) raises DatasetError naming file and 1-based line, unless `skip_bad_lines`,
    in which case bad lines are counted and reported in one warning. Lines after the
    `num_samples`-th good record are not read.
    """
    if max_seq_length < 1 or num_samples < 1:
        raise ValueError(f"max_seq_length and num_samples must be >= 1, got {max_seq_length}, {num_samples}")
    path = Path(path)
    samples: list[list[int]] = []
    skipped = 0
    lines = _read_lines(path)
    lineno = 0
    while len(samples) < num_samples:  # checked before the next line is read: nothing past the last needed
        line = next(lines, None)
        if line is None:
            break
        lineno += 1
        try:
            if isinstance(line, _BadRecord):
                raise line
            content = _parse_line(line)
        except _BadRecord as err:
            if not skip_bad_lines:
                raise DatasetError(f"{path}:{lineno}: {err}") from None
            skipped += 1
            continue
        samples.append(render_and_tokenize(content, tokenizer, max_seq_length))
    if skipped:
        logger.warning("skipped %d bad line(s) in %s", skipped, path)
    if not samples:
        raise DatasetError(f"{path}: no usable calibration records")
    if len(samples) < num_samples:
        logger.warning("%s has only %d usable records, %d requested", path, len(samples), num_samples)
    return samples


def make_batches(samples: list[list[int]], batch_size: int, pad_id: int) -> list[Batch]:
    """Group samples in order into right-padded batches (T = longest sample in batch).

    Order is kept (no length sorting) so a layer-streaming run and a whole-model
    reference run see identical batches, and batch rows map back to sample indices.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    batches = []
    for start in range(0, len(samples), batch_size):
        group = samples[start : start + batch_size]
        width = max(len(s) for s in group)
        input_ids = torch.full((len(group), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(group), width), dtype=torch.long)
        for row, ids in enumerate(group):
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, : len(ids)] = 1
        batches.append(Batch(input_ids=input_ids, attention_mask=attention_mask))
    return batches


def random_token_samples(vocab_size: int, num_samples: int, seq_len: int, seed: int) -> list[list[int]]:
    """Uniform random token ids, seeded: calibration input for speed benchmarks only."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (num_samples, seq_len), generator=generator)
    return ids.tolist()
