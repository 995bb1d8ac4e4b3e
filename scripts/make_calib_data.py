"""Generate data/calib/tiny_chat.jsonl, a small calibration set we can ship.

The text is the documentation of Python standard-library modules (PSF licensed), so the
file carries real English prose without any third-party data set. The output depends on
the Python version's docstrings; it is generated once and committed, and the committed
file (not this script) is what tests and tiny tokenizers read.

Records rotate through the four shapes `streamq.calib.dataset` accepts (chat
`messages`, ShareGPT `conversations`, `input`/`output`, plain `text`) and mix short
function docs with module docs of several hundred tokens.

Usage: python scripts/make_calib_data.py [--out data/calib/tiny_chat.jsonl]
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import random
import warnings
from pathlib import Path

MODULES = (
    "argparse",
    "ast",
    "calendar",
    "cmd",
    "collections",
    "colorsys",
    "configparser",
    "copy",
    "csv",
    "difflib",
    "doctest",
    "fnmatch",
    "getopt",
    "gettext",
    "hashlib",
    "heapq",
    "http.client",
    "inspect",
    "itertools",
    "json",
    "mimetypes",
    "operator",
    "optparse",
    "os",
    "pdb",
    "pickle",
    "plistlib",
    "pprint",
    "random",
    "re",
    "sched",
    "shelve",
    "socket",
    "statistics",
    "string",
    "subprocess",
    "tempfile",
    "textwrap",
    "timeit",
    "tokenize",
    "trace",
    "typing",
    "unittest",
    "urllib.parse",
    "uuid",
)
NUM_RECORDS = 80
MIN_MODULE_DOC = 300
MIN_MEMBER_DOC = 80
MAX_DOC_CHARS = 2400
SYSTEM_PROMPT = "You are a helpful assistant who explains the Python standard library."


def clip(doc: str, limit: int = MAX_DOC_CHARS) -> str:
    """Cut at a paragraph boundary so long module docs stay a few hundred tokens."""
    if len(doc) <= limit:
        return doc
    kept = []
    for paragraph in doc.split("\n\n"):
        if sum(len(p) + 2 for p in kept) + len(paragraph) > limit:
            break
        kept.append(paragraph)
    return "\n\n".join(kept) if kept else doc[:limit]


def module_docs() -> list[tuple[str, str]]:
    """(module name, cleaned docstring) for every module with a substantial docstring."""
    docs = []
    for name in MODULES:
        doc = inspect.cleandoc(importlib.import_module(name).__doc__ or "")
        if len(doc) >= MIN_MODULE_DOC:
            docs.append((name, clip(doc)))
    return docs


def member_docs() -> list[tuple[str, str]]:
    """(qualified name, docstring) of public functions and classes defined in MODULES."""
    docs = []
    for name in MODULES:
        module = importlib.import_module(name)
        for attr in sorted(vars(module)):
            obj = getattr(module, attr)
            if attr.startswith("_") or not (inspect.isfunction(obj) or inspect.isclass(obj)):
                continue
            if getattr(obj, "__module__", None) != module.__name__:
                continue
            with warnings.catch_warnings():  # typing.io / typing.re warn on access
                warnings.simplefilter("ignore", DeprecationWarning)
                doc = inspect.cleandoc(obj.__doc__ or "")
            if len(doc) >= MIN_MEMBER_DOC:
                docs.append((f"{name}.{attr}", clip(doc)))
    return docs


def messages_record(name: str, doc: str, rng: random.Random) -> dict:
    messages = [{"role": "system", "content": SYSTEM_PROMPT}] if rng.random() < 0.5 else []
    messages += [
        {"role": "user", "content": f"What does `{name}` do?"},
        {"role": "assistant", "content": doc},
    ]
    return {"messages": messages}


def conversations_record(name: str, doc: str, rng: random.Random) -> dict:
    first, _, rest = doc.partition("\n\n")
    turns = [
        {"from": "human", "value": f"Can you explain `{name}` briefly?"},
        {"from": "gpt", "value": first},
    ]
    if rest and rng.random() < 0.7:
        turns += [
            {"from": "human", "value": "Thanks. Please go into more detail."},
            {"from": "gpt", "value": rest},
        ]
    return {"conversations": turns}


def input_output_record(name: str, doc: str, rng: random.Random) -> dict:
    return {"input": f"Describe the purpose of `{name}` in Python.", "output": doc}


def text_record(name: str, doc: str, rng: random.Random) -> dict:
    return {"text": doc}


SHAPES = (messages_record, conversations_record, input_output_record, text_record)


def make_records(seed: int = 0) -> list[dict]:
    """Alternate shapes; every third document is a long module doc, the rest member docs."""
    rng = random.Random(seed)
    modules, members = module_docs(), member_docs()
    rng.shuffle(modules)
    rng.shuffle(members)
    records = []
    for i in range(NUM_RECORDS):
        pool = modules if i % 3 == 0 and modules else members
        name, doc = pool.pop()
        records.append(SHAPES[i % len(SHAPES)](name, doc, rng))
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("data/calib/tiny_chat.jsonl"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(r, ensure_ascii=False) for r in make_records(args.seed)]
    args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {len(lines)} records, {args.out.stat().st_size} bytes to {args.out}")


if __name__ == "__main__":
    main()
