"""`python -m streamq` with the CUDA-only output path forced on the CPU: page-locked-style
output arenas (plain host buffers), so a torchrun job on gloo takes the path a GPU run
takes (the writer packing a split layer in a thread beside the propagation, its arena
taken there). Prints how many layers were packed beside. Used by tests/test_dist.py."""

from __future__ import annotations

import sys

from streamq import cli
from streamq.engine import run
from streamq.engine.staging import OutputArenas

if __name__ == "__main__":
    run._output_arenas = lambda job, turns: OutputArenas(count=1 if turns else 2, pin=False)
    beside = run._Writer.pack_beside
    calls = []

    def counted(self, fn, device):
        calls.append(1)
        return beside(self, fn, device)

    run._Writer.pack_beside = counted
    code = cli.main(sys.argv[1:])
    print(f"packed beside: {len(calls)}")
    sys.exit(code)
