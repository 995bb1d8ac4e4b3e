"""Build a tiny offline Hugging Face checkpoint for manual runs of streamq.

Usage: python scripts/make_tiny_models.py --arch qwen3_moe --out /tmp/tiny-moe [--layers 2] [--split]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# Let the script run from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from streamq.testing.tiny_models import ARCHS, build_tiny_model  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=ARCHS, required=True)
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--layers", type=int, default=2, help="number of decoder layers")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", action="store_true", help="shard so one decoder layer spans two files")
    args = parser.parse_args(argv)
    out = build_tiny_model(
        args.arch, args.out, num_layers=args.layers, seed=args.seed, split_layer_across_shards=args.split
    )
    print(f"wrote tiny {args.arch} ({args.layers} layers) to {out}")


if __name__ == "__main__":
    main()
