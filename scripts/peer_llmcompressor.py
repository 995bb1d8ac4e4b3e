"""Quantize a checkpoint with llm-compressor on the same calibration tokens streamq uses, for
side-by-side quality numbers (`streamq eval` then scores both). llm-compressor is not a
dependency of streamq: run this with an environment that has it, e.g.

    python -m venv /tmp/llmc && /tmp/llmc/bin/pip install torch==2.13.0 llmcompressor
    /tmp/llmc/bin/python scripts/peer_llmcompressor.py --model tests/fixtures/trained/dense \\
        --algo gptq --out build/peer/dense-gptq

The calibration samples are streamq's own (`streamq.calib.dataset.load_text_dataset`: the
same file, tokenizer, truncation and order), one sample per batch, unshuffled.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # streamq from this checkout, without installing it there


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--algo", choices=("gptq", "awq"), default="gptq")
    p.add_argument("--data", type=Path, default=ROOT / "tests/fixtures/trained/calib.jsonl")
    p.add_argument("--num-samples", type=int, default=16)
    p.add_argument("--max-seq-length", type=int, default=512)
    p.add_argument("--group-size", type=int, default=128)
    args = p.parse_args(argv)

    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from streamq.calib.dataset import load_text_dataset

    tokenizer = AutoTokenizer.from_pretrained(str(args.model))
    samples = load_text_dataset(args.data, tokenizer, max_seq_length=args.max_seq_length,
                                num_samples=args.num_samples)
    ds = Dataset.from_dict({"input_ids": samples, "attention_mask": [[1] * len(s) for s in samples]})
    model = AutoModelForCausalLM.from_pretrained(str(args.model), dtype=torch.bfloat16)
    scheme = {"targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "symmetric": args.algo == "gptq",
                                                 "strategy": "group", "group_size": args.group_size}}
    if args.algo == "gptq":
        from llmcompressor.modifiers.quantization import GPTQModifier

        recipe = GPTQModifier(config_groups={"group_0": scheme}, ignore=["lm_head", "re:.*mlp.gate$"])
    else:
        from llmcompressor.modifiers.awq import AWQModifier

        recipe = AWQModifier(config_groups={"group_0": scheme}, ignore=["lm_head", "re:.*mlp.gate$"])
    oneshot(model=model, dataset=ds, recipe=recipe, num_calibration_samples=len(samples),
            max_seq_length=args.max_seq_length, shuffle_calibration_samples=False,
            moe_calibrate_all_experts=False)
    model.save_pretrained(str(args.out), save_compressed=True)
    tokenizer.save_pretrained(str(args.out))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
