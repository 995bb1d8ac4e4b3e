"""Progress output on terminals of every shape: a bar wherever a terminal reports a width
or none at all (0 columns), plain log lines when stderr is not a terminal."""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_CHILD = """
import logging, sys
logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
from streamq.engine.progress import LayerProgress
p = LayerProgress(3, "fp8_static tiny")
for i in range(3):
    p.step("read")
    p.layer_done(i, 1000)
p.close()
"""


def _run_on_pty(columns: int, rows: int) -> str:
    """What the child writes to a pseudo-terminal of the given size."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    env["PYTHONPATH"] = str(REPO)
    child = subprocess.Popen([sys.executable, "-c", _CHILD], stdout=slave, stderr=slave, env=env)
    os.close(slave)
    out = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child closed its end
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    assert child.wait(timeout=60) == 0
    return out.decode(errors="replace")


@pytest.mark.parametrize("columns,rows", [(0, 0), (120, 40), (5, 0)])
def test_bar_on_any_terminal(columns, rows):
    out = _run_on_pty(columns, rows)
    assert "3/3" in out and "fp8_static tiny" in out, repr(out)


def test_log_lines_when_not_a_terminal():
    env = dict(os.environ, PYTHONPATH=str(REPO))
    p = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, env=env, timeout=60)
    assert p.returncode == 0
    assert "layer 3/3 done" in p.stderr and "ETA" in p.stderr, p.stderr
