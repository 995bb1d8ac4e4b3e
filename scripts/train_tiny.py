"""Train the small Qwen3-style models under tests/fixtures/trained/, fully offline.

Random-weight tiny models test the file plumbing but not quality: quantization error on
noise says nothing about perplexity. These models have actually learned something (Python
source code from the standard library), so eval tests can demand that FP8 keeps their
perplexity within 1% and flag a layer that breaks it.

  * text: the `.py` files under `sysconfig.get_paths()["stdlib"]` (PSF licensed, source and
    docstrings), minus test suites and site-packages; about one file in ten, chosen by a
    hash of its path, is held out and never trained on;
  * tokenizer: byte-level BPE (`tokenizers`) trained on the training files, ChatML chat
    template and special tokens as in `streamq.testing.tiny_models`;
  * models: `dense` (qwen3) and `moe` (qwen3_moe, 8 experts, top-2), hidden 128, 4 layers,
    from transformers configs; AdamW, warmup + cosine, random 128-token windows, each
    sample BOS + window (the shape eval's plain-text records have);
  * output: bf16 safetensors, tokenizer, generation_config, plus `calib.jsonl` and
    `eval.jsonl` (`{"text"}` records cut from disjoint held-out files) and `train_info.json`
    with the numbers the README quotes.

Usage: python scripts/train_tiny.py [--arch dense moe] [--out tests/fixtures/trained] [--steps N]
The text depends on the Python version's stdlib, so exact bytes are reproducible on the
same Python (and torch) version only; the README records the ones used.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import random
import sys
import sysconfig
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from streamq.testing.tiny_models import (  # noqa: E402
    BOS_ID,
    BOS_TOKEN,
    CHAT_TEMPLATE,
    EOS_ID,
    EOS_TOKEN,
    IM_START,
    PAD_ID,
    PAD_TOKEN,
    SPECIAL_TOKENS,
)

REPO = Path(__file__).resolve().parents[1]
VOCAB_SIZE = 2048
SEQ_LEN = 128
HELDOUT_MOD = 10  # one file in ten is held out
SKIP_DIRS = {"site-packages", "test", "tests", "idle_test", "__pycache__", "lib2to3"}

_COMMON = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
               max_position_embeddings=512, vocab_size=VOCAB_SIZE, rms_norm_eps=1e-6, rope_theta=10000.0,
               bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
ARCH_CONFIGS = {
    "dense": dict(model_type="qwen3", intermediate_size=384, tie_word_embeddings=True),
    # Like Qwen3-30B-A3B / 235B-A22B: untied lm_head, normalized top-k, every layer sparse.
    "moe": dict(model_type="qwen3_moe", intermediate_size=384, moe_intermediate_size=128, num_experts=8,
                num_experts_per_tok=2, decoder_sparse_step=1, norm_topk_prob=True, tie_word_embeddings=False,
                router_aux_loss_coef=0.01),
}
# Per arch: steps chosen so each model trains in under ~10 minutes on 2 CPU cores.
DEFAULT_STEPS = {"dense": 1000, "moe": 1000}


# ---------------------------------------------------------------------------- corpus


def stdlib_files() -> tuple[list[Path], list[Path]]:
    """(train, held-out) source files, in a stable order; held out by a hash of the path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    train, heldout = [], []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if SKIP_DIRS & set(rel.parts[:-1]):
            continue
        digest = int(hashlib.sha1(str(rel).encode()).hexdigest(), 16)
        (heldout if digest % HELDOUT_MOD == 0 else train).append(path)
    return train, heldout


def read_text(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def train_tokenizer(files: list[Path]) -> PreTrainedTokenizerFast:
    """Byte-level BPE; special tokens get ids 0..3 (the ids the configs name)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator((read_text(f) for f in files), trainer)
    # Plain text gets BOS, as in streamq.testing.tiny_models (the chat template adds its own).
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
                                                       special_tokens=[(BOS_TOKEN, BOS_ID)])
    for i, token in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(token) == i, token
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN,
                                   pad_token=PAD_TOKEN, additional_special_tokens=[IM_START],
                                   chat_template=CHAT_TEMPLATE, model_max_length=_COMMON["max_position_embeddings"])


def token_stream(tokenizer: PreTrainedTokenizerFast, files: list[Path]) -> torch.Tensor:
    """All files' tokens, concatenated (EOS between files), as one int32 tensor."""
    ids: list[int] = []
    for f in files:
        ids.extend(tokenizer.encode(read_text(f), add_special_tokens=False))
        ids.append(EOS_ID)
    return torch.tensor(ids, dtype=torch.int32)


def windows(stream: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    """BOS + (SEQ_LEN - 1) tokens from each start: [len(starts), SEQ_LEN] int64."""
    idx = starts[:, None] + torch.arange(SEQ_LEN - 1)[None, :]
    body = stream[idx].long()
    return torch.cat([torch.full((len(starts), 1), BOS_ID, dtype=torch.long), body], dim=1)


def text_records(files: list[Path], count: int, chars: int, seed: int) -> list[dict]:
    """`{"text"}` records: `count` chunks of `chars` characters, each starting at a line.

    Files are visited round-robin (one chunk per file per round) so the records spread over
    as many files as there are.
    """
    rng = random.Random(seed)
    texts = [t for t in (read_text(f) for f in files) if len(t) >= 2 * chars]
    out: list[dict] = []
    while len(out) < count:
        for text in texts:
            start = text.rfind("\n", 0, rng.randrange(0, len(text) - chars)) + 1
            out.append({"text": text[start:start + chars]})
            if len(out) == count:
                break
    return out


def write_text_sets(out: Path, heldout_files: list[Path], seed: int) -> None:
    """calib.jsonl and eval.jsonl, from disjoint halves of the held-out files."""
    out.mkdir(parents=True, exist_ok=True)
    half = len(heldout_files) // 2
    write_jsonl(out / "calib.jsonl", text_records(heldout_files[:half], 16, 700, seed))
    write_jsonl(out / "eval.jsonl", text_records(heldout_files[half:], 32, 700, seed + 1))


# ---------------------------------------------------------------------------- training


def model_config(arch: str):
    spec = dict(ARCH_CONFIGS[arch])
    return AutoConfig.for_model(spec.pop("model_type"), **_COMMON, **spec)


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def perplexity(model: torch.nn.Module, batches: torch.Tensor, device: torch.device, batch_size: int = 16) -> float:
    """exp(mean next-token NLL) over every position of every window, in the model's dtype."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(batches), batch_size):
        ids = batches[i:i + batch_size].to(device)
        logits = model(input_ids=ids).logits.float()
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                reduction="sum")
        total += float(nll)
        count += ids[:, 1:].numel()
    model.train()
    return math.exp(total / count)


def train(arch: str, stream: torch.Tensor, heldout: torch.Tensor, args: argparse.Namespace,
          device: torch.device) -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(args.seed)
    config = model_config(arch)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).to(device)
    if arch == "moe":
        model.config.output_router_logits = True  # the load-balancing loss keeps every expert in use
    steps = args.steps or DEFAULT_STEPS[arch]
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    gen = torch.Generator().manual_seed(args.seed)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast(
        "cpu", enabled=False)
    t0 = time.monotonic()
    model.train()
    for step in range(steps):
        starts = torch.randint(0, len(stream) - SEQ_LEN, (args.batch_size,), generator=gen)
        ids = windows(stream, starts).to(device)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, args.lr, warmup=min(100, steps // 10))
        with autocast:
            loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"[{arch}] step {step}/{steps} loss {loss.item():.3f} {time.monotonic() - t0:.0f}s", flush=True)
    train_s = time.monotonic() - t0
    model.config.output_router_logits = False
    model = model.to(torch.bfloat16)
    info = {"arch": arch, "model_type": config.model_type, "steps": steps, "batch_size": args.batch_size,
            "seq_len": SEQ_LEN, "lr": args.lr, "seed": args.seed, "train_seconds": round(train_s, 1),
            "train_tokens": steps * args.batch_size * SEQ_LEN, "device": str(device),
            "params": sum(p.numel() for p in model.parameters()),
            "heldout_windows": len(heldout), "heldout_ppl_bf16": round(perplexity(model, heldout, device), 3),
            "uniform_ppl": VOCAB_SIZE}
    return model, info


def save(model: torch.nn.Module, tokenizer: PreTrainedTokenizerFast, out: Path) -> int:
    """bf16 safetensors + tokenizer + generation config; returns the directory's size in bytes."""
    out.mkdir(parents=True, exist_ok=True)
    model.cpu().save_pretrained(out)
    tokenizer.save_pretrained(out)
    GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID).save_pretrained(out)
    return sum(p.stat().st_size for p in out.iterdir() if p.is_file())


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", nargs="+", choices=sorted(ARCH_CONFIGS), default=sorted(ARCH_CONFIGS))
    parser.add_argument("--out", type=Path, default=REPO / "tests" / "fixtures" / "trained")
    parser.add_argument("--steps", type=int, default=0, help=f"optimizer steps (default per arch: {DEFAULT_STEPS})")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    # One thread by default: the same bytes whatever the core count, and no OpenMP spin-waiting
    # when the machine is shared (which made 2 threads slower than 1 on a busy 2-core box).
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda")
    parser.add_argument("--text-only", action="store_true", help="only (re)write calib.jsonl and eval.jsonl")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    hf_logging.set_verbosity_error()  # whole files exceed model_max_length; they are cut into windows
    torch.set_flush_denormal(True)  # Adam's tiny second moments turn denormal and stall the CPU
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)

    t0 = time.monotonic()
    train_files, heldout_files = stdlib_files()
    if args.text_only:
        write_text_sets(args.out, heldout_files, args.seed)
        return
    tokenizer = train_tokenizer(train_files)
    stream = token_stream(tokenizer, train_files)
    held_stream = token_stream(tokenizer, heldout_files)
    # Held-out perplexity windows: fixed, non-overlapping, seeded.
    held_starts = torch.arange(0, len(held_stream) - SEQ_LEN, SEQ_LEN)
    held_starts = held_starts[torch.randperm(len(held_starts), generator=torch.Generator().manual_seed(1))[:256]]
    heldout = windows(held_stream, held_starts.sort().values)
    data_s = time.monotonic() - t0
    print(f"{len(train_files)} train files ({len(stream)} tokens), {len(heldout_files)} held-out files "
          f"({len(held_stream)} tokens); tokenizer and data in {data_s:.0f}s", flush=True)

    write_text_sets(args.out, heldout_files, args.seed)
    summary = {"python": platform.python_version(), "torch": torch.__version__, "command": " ".join(sys.argv),
               "vocab_size": VOCAB_SIZE, "train_files": len(train_files), "heldout_files": len(heldout_files),
               "train_stream_tokens": len(stream), "heldout_stream_tokens": len(held_stream), "models": {}}
    info_path = args.out / "train_info.json"
    if info_path.is_file():  # training one arch keeps the other's record
        summary["models"] = json.loads(info_path.read_text()).get("models", {})
    for arch in args.arch:
        model, info = train(arch, stream, heldout, args, device)
        info["bytes"] = save(model, tokenizer, args.out / arch)
        print(json.dumps(info), flush=True)
        summary["models"][arch] = info
    info_path.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
