"""Progress (layer i of N, step, MB/s, ETA) and the end-of-run resource measurements."""

from __future__ import annotations

import logging
import os
import resource
import sys
import time

import psutil
import torch
from tqdm import tqdm

log = logging.getLogger("streamq")


def peak_host_rss() -> int:
    """Peak resident set size of this process in bytes.

    Linux: VmHWM of /proc/self/status. ru_maxrss is not used there because it survives
    fork + exec: a streamq started by a large process (a notebook, a test runner) would
    report its parent's RSS as its own peak.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def current_host_rss() -> int:
    return psutil.Process().memory_info().rss


def peak_gpu_bytes(device: torch.device) -> int:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


# Width of the bar where the terminal reports no usable width (a pty with no size set,
# some CI runners and container consoles report 0 columns; tqdm then prints nothing).
FIXED_BAR_COLUMNS = 100
FIXED_BAR_ROWS = 20
_MIN_COLUMNS = 20  # narrower than this, a bar shows nothing useful


def terminal_columns(stream) -> int:
    """Columns of the terminal behind `stream`, 0 when it reports none (or is no terminal)."""
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):
        return 0


class LayerProgress:
    """A tqdm bar on a terminal; one log line per layer otherwise (CI logs, files).

    A terminal that reports (almost) zero columns gets a bar of fixed width: tqdm sized
    to the terminal would print an empty line there.
    """

    def __init__(self, total: int, desc: str, enabled: bool = True):
        self.total, self.start = total, time.monotonic()
        self.done = 0
        self.bytes = 0
        self.tty = enabled and sys.stderr.isatty()
        self.bar = None
        if self.tty:
            if terminal_columns(sys.stderr) >= _MIN_COLUMNS:
                self.bar = tqdm(total=total, desc=desc, unit="layer", dynamic_ncols=True, file=sys.stderr)
            else:
                # Both given: tqdm then does not ask the terminal, whose 0 x 0 it would take as
                # -1 rows and hide the bar.
                self.bar = tqdm(total=total, desc=desc, unit="layer", ncols=FIXED_BAR_COLUMNS,
                                nrows=FIXED_BAR_ROWS, file=sys.stderr)
        self.enabled = enabled

    def step(self, step: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(step, refresh=True)

    def layer_done(self, index: int, nbytes: int, note: str = "") -> None:
        self.done += 1
        self.bytes += nbytes
        elapsed = time.monotonic() - self.start
        rate = self.bytes / elapsed / 1e6 if elapsed > 0 else 0.0
        eta = elapsed / self.done * (self.total - self.done)
        if self.bar is not None:
            self.bar.set_postfix_str(f"{rate:.0f} MB/s {note}".strip(), refresh=False)
            self.bar.update(1)
        elif self.enabled:
            log.info("layer %d/%d done (%s) %.0f MB/s, elapsed %.1fs, ETA %.1fs %s", index + 1, self.total,
                     fmt_bytes(nbytes), rate, elapsed, eta, note)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
