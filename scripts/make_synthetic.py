"""Write a synthetic Hugging Face checkpoint with a real model's layout and N layers.

The tensor names, shapes, bf16 dtype, sharding and config.json are those of the named
model; the weights are seeded random values (see streamq/testing/synthetic.py).

Usage:
  python scripts/make_synthetic.py --geometry qwen3-235b-a22b --layers 4 --out /tmp/q235 \
      [--seed 0] [--device cpu|cuda] [--shard-size-gb 4] [--vocab-size V]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# Run from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from streamq.errors import StreamqError  # noqa: E402
from streamq.testing.synthetic import GEOMETRIES, write_synthetic  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--geometry", required=True, choices=sorted(GEOMETRIES))
    parser.add_argument("--layers", type=int, default=None,
                        help="decoder layers to write (default: the model's full depth)")
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu",
                        help="where random values are drawn: cpu (tiled fast path) or cuda (i.i.d.)")
    parser.add_argument("--shard-size-gb", type=float, default=4.0)
    parser.add_argument("--vocab-size", type=int, default=None,
                        help="override the vocabulary (keeps embeddings small in benchmarks)")
    args = parser.parse_args(argv)
    try:
        write_synthetic(
            args.geometry, args.out, args.layers, seed=args.seed, device=args.device,
            shard_size_gb=args.shard_size_gb, vocab_size=args.vocab_size,
            log=lambda msg: print(msg, flush=True),
        )
    except StreamqError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
