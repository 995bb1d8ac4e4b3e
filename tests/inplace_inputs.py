"""`python -m streamq` with every Linear changing its input in place after using it (by
adding zero: the values stay, the tensor's version moves), as a model that reuses an
activation buffer would. Under torchrun the split replay must refuse to send such an
input (tests/test_dist.py)."""

from __future__ import annotations

import sys

import torch

from streamq import cli

if __name__ == "__main__":
    linear_forward = torch.nn.Linear.forward

    def forward(self, input):
        out = linear_forward(self, input)
        if not torch.is_grad_enabled():
            input.add_(0)
        return out

    torch.nn.Linear.forward = forward
    sys.exit(cli.main(sys.argv[1:]))
