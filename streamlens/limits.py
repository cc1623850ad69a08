"""The limits every command shares, torch-free so the CLI checks them before any heavy import.

The bootstrap rule: at least `MIN_BOOTSTRAP` replicates (fewer leave a 2.5% tail of the 95% interval
without a single draw), and draws [value, n_boot, text] of float64 that fit in half of the available
memory. `ablation.options.EvalOptions` and every command (`cli.common`) apply this one rule.
"""

from __future__ import annotations

import os

__all__ = ["BOOTSTRAP_MEMORY_SHARE", "MIN_BOOTSTRAP", "available_memory", "check_bootstrap_memory", "check_n_boot"]

MIN_BOOTSTRAP = 40  # fewer replicates leave a 2.5% tail of the 95% interval without a single draw
BOOTSTRAP_MEMORY_SHARE = 0.5  # the bootstrap's draws may take at most this share of the available memory


def check_n_boot(n_boot: int) -> int:
    """The one rule on bootstrap replicates, shared by every command: a whole number of at least MIN_BOOTSTRAP."""
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < MIN_BOOTSTRAP:
        raise ValueError(f"--bootstrap {n_boot!r} must be a whole number of at least {MIN_BOOTSTRAP} (fewer leave the "
                         f"tails of the 95% interval without a draw)")
    check_bootstrap_memory(n_boot, 1, 2)  # the smallest run (one value, two texts): refused before any model loads
    return n_boot


def check_bootstrap_memory(n_boot: int, n_values: int, n_texts: int) -> None:
    """Refuse, before any work, a bootstrap whose draws [value, n_boot, text] (float64) would not fit in memory."""
    need = 8 * n_boot * max(1, n_values) * max(1, n_texts)
    free = available_memory()
    if free is not None and need > BOOTSTRAP_MEMORY_SHARE * free:
        most = int(BOOTSTRAP_MEMORY_SHARE * free) // (8 * max(1, n_values) * max(1, n_texts))
        raise ValueError(f"--bootstrap {n_boot} needs {need / 1e9:.3g} GB for {n_values} values x {n_texts} texts, more "
                         f"than half of the {free / 1e9:.3g} GB available: use at most {most}")


def available_memory() -> int | None:
    """Bytes of memory available to new allocations (Linux /proc/meminfo; None where unknown)."""
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
