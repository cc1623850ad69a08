"""The default run of every command, one after another, each in its own process: one table.

Each command runs as `python -m streamlens <command>` with its defaults (only `--out` points into a
temporary folder; `lens eval` reads the lens `lens train` just wrote), in a fresh process, so the
model load and imports are counted as a user would see them. For each: wall seconds, user + sys CPU
seconds of the process and its children (`os.wait4`), peak RSS, the load average when it started and
the exit code. On a shared machine the CPU seconds are the comparable figure; the load average says
how much the wall time is inflated.

    python benchmarks/bench_defaults.py                          # every command (~8 min on 2 free cores)
    python benchmarks/bench_defaults.py --only layers,identity   # some of them
    python benchmarks/bench_defaults.py --only identity --args "identity=--max-per-text 0"
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

COMMANDS = ("ablate", "decompose", "report", "check", "layers", "identity", "lens", "highway", "residuals", "prune")
GOAL_SECONDS = 180.0  # the goal: every default run under 3 minutes on 2 cores


@dataclass(frozen=True)
class Run:
    """One finished command: what ran and what it cost."""

    label: str
    wall: float
    cpu: float
    peak_rss_mb: float
    load: float
    returncode: int


def command_lines(command: str, out: Path) -> list[tuple[str, list[str]]]:
    """(label, argv after `python -m streamlens`) of one command's default run; lens is train then eval."""
    if command == "lens":
        lens = out / "lens"
        return [("lens train", ["lens", "train", "--out", str(lens)]),
                ("lens eval", ["lens", "eval", "--lens", str(lens / "lens.safetensors"), "--out", str(lens)])]
    target = {"report": out / "report.html", "decompose": out / "decompose.csv"}.get(command, out / command)
    return [(command, [command, "--out", str(target)])]


def run_one(label: str, argv: list[str], timeout: float, log: Path) -> Run:
    """Run `python -m streamlens argv` to the end (or `timeout` seconds), its output into `log`."""
    load = os.getloadavg()[0]
    started = time.perf_counter()
    with open(log, "wb") as sink:
        process = subprocess.Popen([sys.executable, "-m", "streamlens", *argv], stdout=sink, stderr=subprocess.STDOUT)
        deadline = started + timeout
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() > deadline:
                process.kill()
                _, status, usage = os.wait4(process.pid, 0)
                break
            time.sleep(0.2)
    wall = time.perf_counter() - started
    code = os.waitstatus_to_exitcode(status)
    return Run(label, wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, load, code)


def table(runs: list[Run]) -> str:
    """A markdown table of the runs."""
    lines = ["| command | wall s | user+sys CPU s | peak RSS MB | load average at start | exit |",
             "|---|---|---|---|---|---|"]
    for run in runs:
        lines.append(f"| `{run.label}` | {run.wall:.1f} | {run.cpu:.1f} | {run.peak_rss_mb:.0f} | {run.load:.1f} | "
                     f"{run.returncode if run.returncode >= 0 else 'killed'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(COMMANDS), help=f"Commands to run, comma-separated ({', '.join(COMMANDS)}).")
    parser.add_argument("--timeout", type=float, default=1800.0, help="Seconds before a command is stopped.")
    parser.add_argument("--args", action="append", default=[], metavar="COMMAND=ARGS",
                        help="Extra arguments for one command, e.g. 'layers=--max-windows 16' (repeatable).")
    parser.add_argument("--keep", default=None, help="Folder to keep the outputs and logs in (default: a temporary one).")
    args = parser.parse_args()
    chosen = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in COMMANDS]
    if unknown:
        parser.error(f"--only {','.join(unknown)}: unknown command; choose from {', '.join(COMMANDS)}")
    extra = dict(item.split("=", 1) for item in args.args)
    out = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_defaults-"))
    out.mkdir(parents=True, exist_ok=True)
    print(f"{os.cpu_count()} cores, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; outputs in {out}",
          flush=True)
    runs = []
    for command in chosen:
        for label, argv in command_lines(command, out):
            argv = argv + shlex.split(extra.get(label, extra.get(command, "")) if label != "lens eval" else "")
            run = run_one(label, argv, args.timeout, out / f"{label.replace(' ', '_')}.log")
            runs.append(run)
            print(f"{label}: wall {run.wall:.1f} s, CPU {run.cpu:.1f} s, peak RSS {run.peak_rss_mb:.0f} MB, load "
                  f"{run.load:.1f}, exit {run.returncode}", flush=True)
    print()
    print(table(runs))
    slow = [run.label for run in runs if run.wall > GOAL_SECONDS]
    busy = max(run.load for run in runs) > (os.cpu_count() or 1)
    print(f"\nover {GOAL_SECONDS:.0f} s wall (the goal, on {os.cpu_count()} cores): {', '.join(slow) if slow else 'none'}"
          + ("  [the machine was busy: load above its cores; compare CPU seconds]" if busy else ""))


if __name__ == "__main__":
    main()
