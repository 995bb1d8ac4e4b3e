"""Benchmark helpers for `scripts/bench.py`: what streamq costs over the I/O and compute floor.

- `floors`: page-cache control (drop or warm), the plain read/write I/O floor, and the
  compute floor (the layers' forwards alone, weights already on the device).
- `worker`: the subprocess entry (`python -m streamq.bench.worker`) that runs one measured
  job (synthesis, one `quantize`, or the compute floor) so peak RSS and GPU peaks never mix.
- `render`: bench.md (Markdown tables) and bench.png (matplotlib, Agg).

See docs/benchmarks.md for what each number means.
"""
