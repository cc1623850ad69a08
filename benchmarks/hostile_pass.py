"""A hostile user's pass over every command (issue 19): wrong paths, damaged files, absurd numbers,
SIGINT mid-run, two runs at once into one --out. Prints one row per case and the counts.

A case holds when the command does what it says: bad input ends in exit 2 with one `error:` line on
stderr, no traceback and no output folder; good input exits 0; an interrupted run leaves no half-written
output and the next run finishes; two runs into one --out leave one whole set. Runs on tiny random
models (bad input runs in this process through the CLI runner; lens files, SIGINT and concurrent runs are
fresh `python -m streamlens` processes):

    python benchmarks/hostile_pass.py [--only ablate] [--workdir /tmp/hostile]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEXT = " ".join(f"w{3 + (7 * k) % 61}" for k in range(40))


def streamlens(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "streamlens", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=timeout)


def in_process(argv: list) -> tuple[bool, str]:
    """Run one bad-input case in this process (the CLI's own code, minus ~10 s of imports per case)."""
    from typer.testing import CliRunner

    from streamlens.cli import app

    out = out_of(argv)
    result = CliRunner().invoke(app, [str(a) for a in argv])
    lines = [line for line in result.output.strip().splitlines() if line.strip() and "%|" not in line]
    crashed = result.exception is not None and not isinstance(result.exception, SystemExit)
    ok = (result.exit_code == 2 and bool(lines) and lines[-1].startswith("error: ") and not crashed
          and (out is None or not out.exists()))
    said = repr(result.exception)[:150] if crashed else (lines[-1] if lines else "")[:150]
    return ok, f"rc {result.exit_code}: {said}"


def refused(result: subprocess.CompletedProcess, out: Path | None = None) -> tuple[bool, str]:
    """Exit 2, one `error:` line, no traceback, nothing written."""
    lines = [line for line in result.stderr.strip().splitlines() if line.strip() and "%|" not in line]
    ok = (result.returncode == 2 and len(lines) >= 1 and lines[-1].startswith("error: ")
          and "Traceback" not in result.stderr and (out is None or not out.exists()))
    return ok, f"rc {result.returncode}: {(lines[-1] if lines else result.stdout.strip()[-100:])[:150]}"


def succeeded(result: subprocess.CompletedProcess) -> tuple[bool, str]:
    return result.returncode == 0, f"rc {result.returncode}: {result.stderr.strip()[-150:]}"


def fixtures(work: Path) -> dict[str, Path]:
    from streamlens.testing import tiny_model_folder, tiny_tokenizer

    made = {"model": work / "model"}
    if not made["model"].exists():
        tiny_model_folder(made["model"], arch="llama")
    texts = work / "texts.jsonl"
    lines = [" ".join(f"w{3 + (7 * i + 3 * k) % 60}" for k in range(12)) for i in range(6)]
    texts.write_text("".join(json.dumps({"text": line}) + "\n" for line in lines))
    made["texts"] = texts
    damaged = work / "damaged"
    if damaged.exists():
        shutil.rmtree(damaged)
    shutil.copytree(made["model"], damaged)
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    made["damaged"] = damaged
    mismatch = work / "mismatch"
    if mismatch.exists():
        shutil.rmtree(mismatch)
    shutil.copytree(made["model"], mismatch)
    config = json.loads((mismatch / "config.json").read_text())
    config["intermediate_size"] += 8
    (mismatch / "config.json").write_text(json.dumps(config))
    made["mismatch"] = mismatch
    from transformers import BertConfig, BertForMaskedLM

    bert = work / "bert"
    if not bert.exists():
        BertForMaskedLM(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=64, max_position_embeddings=64)).save_pretrained(bert)
        tiny_tokenizer().save_pretrained(bert)
    made["bert"] = bert
    (work / "a-file").write_text("not a folder")
    made["file"] = work / "a-file"
    (work / "fake.gguf").write_bytes(b"not gguf" * 100)
    made["fake_gguf"] = work / "fake.gguf"
    return made


def bad_input_cases(f: dict[str, Path], work: Path) -> list[tuple[str, list]]:
    """(command label, argv) whose every run must be refused in one line, writing nothing."""
    m, t = ["--model", f["model"]], ["--data", TEXT, "--window", "8", "--max-windows", "2"]
    return [
        ("ablate", ["ablate", "--model", work / "missing", *t]),
        ("ablate", ["ablate", "--model", f["file"], *t]),
        ("ablate", ["ablate", "--model", f["fake_gguf"], *t]),
        ("ablate", ["ablate", "--model", f["damaged"], *t]),
        ("ablate", ["ablate", "--model", f["mismatch"], *t]),
        ("ablate", ["ablate", "--model", f["bert"], *t]),
        ("ablate", ["ablate", *m, "--data", work / "missing.jsonl"]),
        ("ablate", ["ablate", *m, *t, "--bootstrap", "100000000000"]),
        ("ablate", ["ablate", *m, *t, "--bootstrap", "39"]),
        ("ablate", ["ablate", *m, *t, "--layers", "99"]),
        ("ablate", ["ablate", *m, *t, "--unit", "head", "--heads", "-1"]),
        ("ablate", ["ablate", *m, *t, "--window", "0"]),
        ("ablate", ["ablate", *m, *t, "--metrics", "nope"]),
        ("ablate", ["ablate", *m, *t, "--positions", "999:"]),
        ("ablate", ["ablate", *m, *t, "--out", f["file"]]),
        ("ablate", ["ablate", *m, *t, "--out", "/proc/streamlens-out"]),
        ("ablate", ["ablate", *m, *t, "--workers", "4096"]),
        ("ablate", ["ablate", *m, *t, "--ray-address", "127.0.0.1:1"]),
        ("decompose", ["decompose", *m, "--prompt", ""]),
        ("decompose", ["decompose", *m, "--prompt", "w5 w6", "--target", "w5 w6"]),
        ("decompose", ["decompose", *m, "--prompt", "w5 w6", "--position", "99"]),
        ("decompose", ["decompose", *m, "--prompt", "w5 w6", "--out", "/proc/x.csv"]),
        ("decompose", ["decompose", "--model", f["bert"], "--prompt", "w5 w6"]),
        ("decompose", ["decompose", "--model", f["mismatch"], "--prompt", "w5 w6"]),
        ("decompose", ["decompose", *m, "--prompt", "w5 w6", "--dtype", "int8"]),
        ("report", ["report", *m, "--out", "/proc/r.html"]),
        ("report", ["report", *m, "--out", work / "r.txt"]),
        ("report", ["report", *m, "--lens", f["file"], "--out", work / "r.html"]),
        ("report", ["report", *m, "--data", work / "missing.jsonl", "--out", work / "r2.html"]),
        ("highway", ["highway", "--lr", "1e9", "--steps", "5", "--depths", "2", "--out", work / "hw"]),
        ("highway", ["highway", "--steps", "-1", "--out", work / "hw2"]),
        ("highway", ["highway", "--depths", "0", "--out", work / "hw3"]),
        ("highway", ["highway", "--out", "/proc/hw"]),
        ("check", ["check", work / "missing"]),
        ("check", ["check", f["bert"]]),
        ("check", ["check", f["mismatch"]]),
        ("check", ["check", f["model"], "--dtype", "int8"]),
        ("check", ["check", f["model"], "--out", "/proc/c"]),
        ("layers", ["layers", *m, "--bootstrap", "10", "--out", work / "l1"]),
        ("layers", ["layers", *m, "--max-windows", "1", "--out", work / "l2"]),
        ("layers", ["layers", *m, "--model", work / "missing", "--out", work / "l3"]),
        ("layers", ["layers", *m, "--out", "/proc/l"]),
        ("identity", ["identity", *m, "--alpha", "inf", "--out", work / "i1"]),
        ("identity", ["identity", *m, "--alpha", "nan", "--out", work / "i2"]),
        ("identity", ["identity", *m, "--data", "w5 w6 w7 w8", "--out", work / "i3"]),
        ("identity", ["identity", *m, "--data", f["texts"], "--remove-skips", "99", "--out", work / "i4"]),
        ("lens", ["lens", "train", *m, "--lr", "2", "--out", work / "lt1"]),
        ("lens", ["lens", "train", *m, "--steps", "0", "--out", work / "lt2"]),
        ("lens", ["lens", "train", *m, "--hold-out-every", "1", "--out", work / "lt3"]),
        ("lens", ["lens", "eval", "--lens", f["file"], *m, "--out", work / "le1"]),
        ("lens", ["lens", "eval", "--lens", work / "missing.safetensors", *m, "--out", work / "le2"]),
    ]


def out_of(argv: list) -> Path | None:
    argv = [str(a) for a in argv]
    if "--out" in argv and not argv[argv.index("--out") + 1].startswith("/proc"):
        path = Path(argv[argv.index("--out") + 1])
        return None if path.exists() else path
    return None


def lens_cases(f: dict[str, Path], work: Path) -> list[tuple[str, str, tuple[bool, str]]]:
    """Train a lens, then damage it, evaluate it on its training texts, and on a model of another width."""
    from streamlens.testing import tiny_model_folder

    m = ["--model", f["model"]]
    out = work / "lens"
    trained = streamlens("lens", "train", *m, "--data", f["texts"], "--window", "8", "--steps", "3",
                         "--batch-tokens", "8", "--hold-out-every", "2", "--out", out)
    rows = [("lens", "train on 6 texts, every 2nd held out", succeeded(trained))]
    rows.append(("lens", "eval: its own held-out texts", succeeded(
        streamlens("lens", "eval", "--lens", out / "lens.safetensors", *m, "--window", "8", "--out", work / "le3"))))
    rows.append(("lens", "eval on its training texts", refused(streamlens(
        "lens", "eval", "--lens", out / "lens.safetensors", *m, "--data", f["texts"], "--window", "8", "--out",
        work / "le4"), work / "le4")))
    flipped = work / "flipped.safetensors"
    data = bytearray((out / "lens.safetensors").read_bytes())
    data[-3] ^= 1
    flipped.write_bytes(bytes(data))
    rows.append(("lens", "eval a lens with one flipped byte", refused(streamlens(
        "lens", "eval", "--lens", flipped, *m, "--window", "8", "--out", work / "le5"), work / "le5")))
    rows.append(("report", "report --lens with one flipped byte", refused(streamlens(
        "report", *m, "--lens", flipped, "--out", work / "r3.html"), work / "r3.html")))
    wide = work / "wide"
    if not wide.exists():
        tiny_model_folder(wide, arch="llama", d_model=48)
    rows.append(("lens", "eval a lens on a model of another width", refused(streamlens(
        "lens", "eval", "--lens", out / "lens.safetensors", "--model", wide, "--window", "8", "--out", work / "le6"),
        work / "le6")))
    return rows


def interrupt_cases(f: dict[str, Path], work: Path) -> list[tuple[str, str, tuple[bool, str]]]:
    """SIGINT mid-run, then the same command: no output before, one whole set after (ablate resumes)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    rows = []
    commands = {
        "ablate": ["ablate", "--model", f["model"], "--data", TEXT, "--window", "8", "--max-windows", "4", "--unit",
                   "head", "--batch-size", "1", "--bootstrap", "40"],
        "lens": ["lens", "train", "--model", f["model"], "--data", f["texts"], "--window", "8", "--steps", "400",
                 "--batch-tokens", "8", "--hold-out-every", "2"],
        "highway": ["highway", "--depths", "2,4", "--steps", "400", "--model", f["model"], "--remove-skips", "1",
                    "--window", "8"],
    }
    for name, argv in commands.items():
        out = work / f"sigint-{name}"
        shutil.rmtree(out, ignore_errors=True)
        process = subprocess.Popen([sys.executable, "-m", "streamlens", *map(str, argv), "--out", str(out)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, text=True)
        time.sleep(12)
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=120)
        visible = sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) if out.exists() else []
        rows.append((name, "SIGINT mid-run: nothing visible written, no traceback",
                     (not visible and "Traceback" not in err, f"rc {process.returncode}, files {visible}, "
                                                              f"{err.strip().splitlines()[-1:]}")))
        again = streamlens(*argv, "--out", out, timeout=600)
        rows.append((name, "the same command after SIGINT finishes", succeeded(again)))
    return rows


def concurrent_cases(f: dict[str, Path], work: Path) -> list[tuple[str, str, tuple[bool, str]]]:
    """Two runs at once into one --out: both finish, and the folder holds one run's whole set."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    out = work / "twice"
    shutil.rmtree(out, ignore_errors=True)
    runs = [["ablate", "--model", f["model"], "--data", TEXT, "--window", "8", "--max-windows", "4", "--bootstrap",
             "40", "--no-checkpoint", "--seed", str(seed), "--out", str(out)] for seed in (0, 1)]
    processes = [subprocess.Popen([sys.executable, "-m", "streamlens", *map(str, argv)], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, env=env, text=True) for argv in runs]
    codes = [process.wait(timeout=600) for process in processes]
    meta = json.loads((out / "ablation.json").read_text()) if (out / "ablation.json").exists() else {}
    seeds = {meta.get("seed")}
    ok = codes == [0, 0] and seeds <= {0, 1} and len(seeds) == 1
    return [("ablate", "two runs at once into one --out", (ok, f"codes {codes}, seed in json {seeds}"))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/streamlens-hostile")
    parser.add_argument("--only", default=None, help="one group: bad, lens, interrupt, concurrent")
    args = parser.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT))
    f = fixtures(work)
    rows = []
    if args.only in (None, "bad"):
        for command, argv in bad_input_cases(f, work):
            started = time.perf_counter()
            held, said = in_process(argv)
            rows.append((command, " ".join(str(a).replace(str(work), "W") for a in argv[1:])[:90], (held, said)))
            print(f"{'held' if held else 'BROKE':5} {time.perf_counter() - started:5.1f}s {rows[-1][0]}: {rows[-1][1]} "
                  f"-> {said}", flush=True)
    for group, make in (("lens", lens_cases), ("interrupt", interrupt_cases), ("concurrent", concurrent_cases)):
        if args.only in (None, group):
            for row in make(f, work):
                rows.append(row)
                print(f"{'held' if row[2][0] else 'BROKE':5} {row[0]}: {row[1]} -> {row[2][1]}", flush=True)
    held = sum(row[2][0] for row in rows)
    print(f"\n{len(rows)} cases tried, {held} held, {len(rows) - held} broke")


if __name__ == "__main__":
    main()
