#!/usr/bin/env python3
"""Issue 35 ("Reliability, round 4") re-trial harness: a new user's command lines against every stage.

    nice -n 19 python3 scripts/trial/harness.py --repo /path/to/clone [--only N] [--jobs 1] [--filter TEXT] [--list]

Every case is one shell command line ``<repo>/.venv/bin/python -m experiments.<stage> ...`` run with
``cwd=<repo>`` in its own fresh case directory (``<work>/cases/NNN/w``, the only place it is told to read or write:
its own --out, its own --ledger seeded with one earlier charge, its own copies of the data and of any damaged
model/adapter/run). The tiny random Qwen2 model (real Qwen2.5 tokenizer), the simulated data and the finished tiny
runs some cases start from are built once per invocation, lazily, under ``<work>/fixtures`` by the repository's
own code (fixtures.py beside this file, run in the repository's venv).

For each case the harness records the exit status, stderr, whether stderr holds "Traceback", the wall time
(``--timeout``, default 120 s: past it the process group is killed and the case is a "hang"), which files of the
case directory changed, vanished or appeared (sha256 of every regular file before/after) and whether the ledger
gained a line, and classifies it:

  refused       exit 2, exactly one non-empty stderr line that names the problem, nothing of the user's changed,
                nothing charged, nothing written
  ok            exit 0 on a legal input and the case's own check of the result passes (warnings allowed)
  traceback     "Traceback" on stderr
  loss          a file that was there before (the user's, a run's, the ledger's earlier lines) changed or vanished
  silent        exit 0 on an input that should be refused, or exit 0 with a wrong result (the check failed)
  hang          still running at the timeout
  late          refused (exit 2, one line) but a ledger line was charged or files/directories were written first
  multi-line    exit 2 with more than one non-empty stderr line (or none)
  vague         exit 2, one line, but the line names none of what the case expects it to name
  over-refused  exit 2 on an input that is legal (the case expected ok)
  bad-exit      any other exit status (1, a signal, ...) without a traceback
  fixture-error the harness could not build what the case starts from (not a finding about the stage)
  skipped       the case cannot be tried here (chmod 000 on a file root can still read, no mknod)

Results: ``--results`` (JSON lines, default /tmp/trial/results.jsonl) and ``--summary`` (default
/tmp/trial/summary.md).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import os
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
FIXTURES_PY = HERE / "fixtures.py"
TOKENIZER = Path(os.environ.get("MINIQWEN_TRIAL_TOKENIZER") or
                 Path(__file__).resolve().parents[3] / "shared" / "models" / "qwen2.5-tokenizer")
STAGES = ("baseline", "classical", "lora_default", "sweep", "context_length", "search", "final", "forecast", "flops",
          "benchmark", "train", "report")
CHARGING = {"baseline", "lora_default", "sweep", "context_length", "search", "final", "train"}
FAILURES = ("traceback", "loss", "silent", "hang", "late", "multi-line", "vague", "over-refused", "bad-exit")
EARLIER = {"time": "2025-01-01T00:00:00+00:00", "stage": "earlier", "kind": "train", "flops": 12345}


class FixtureError(RuntimeError):
    pass


class Skip(RuntimeError):
    pass


# ============================================================================================ fixtures (lazy)

class Fixtures:
    """Builds, once, what cases start from: the tiny model, the data, token chunks, finished tiny runs, damaged
    models and data files. Everything is built by the repository's own code in its venv."""

    def __init__(self, repo: Path, root: Path, timeout: float):
        self.repo, self.root, self.timeout = repo, root, timeout
        self.py = repo / ".venv" / "bin" / "python"
        self.root.mkdir(parents=True, exist_ok=True)
        self.ledger = self.root / "fixture_ledger.jsonl"
        self._lock = threading.RLock()
        self._built: dict[str, Path] = {}
        self._failed: dict[str, str] = {}

    def _run(self, argv: list[str], what: str) -> None:
        env = clean_env(self.root / "env", self.ledger, self.root / "model", self.root / "lv.h5")
        try:
            p = subprocess.run(argv, cwd=self.repo, env=env, capture_output=True, text=True,
                               timeout=max(self.timeout * 3, 300), stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise FixtureError(f"{what}: timed out") from None
        if p.returncode != 0:
            tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
            raise FixtureError(f"{what}: exit {p.returncode}: {' | '.join(tail)}")

    def path(self, name: str) -> Path:
        with self._lock:
            if name in self._built:
                return self._built[name]
            if name in self._failed:
                raise FixtureError(self._failed[name])
            try:
                p = self._build(name)
            except FixtureError as err:
                self._failed[name] = str(err)
                raise
            self._built[name] = p
            return p

    def _helper(self, *args: str, what: str) -> None:
        self._run([str(self.py), str(FIXTURES_PY), *args], what)

    def _stage(self, stage: str, args: list[str], what: str) -> None:
        self._run([str(self.py), "-m", f"experiments.{stage}", *args], what)

    def _build(self, name: str) -> Path:
        r = self.root
        if name == "model":
            p = r / "model"
            if not (p / "model.safetensors").is_file():
                shutil.rmtree(p, ignore_errors=True)
                self._helper("model", str(p), what="tiny model")
            return p
        if name == "data":
            p = r / "lv.h5"
            if not p.is_file():
                self._helper("data", str(p), what="simulated data")
            return p
        if name.startswith("chunks"):  # chunks, chunks:<n>:<width>:<seed>
            parts = name.split(":")[1:] or ["6", "16", "2"]
            p = r / f"chunks_{'_'.join(parts)}.safetensors"
            if not p.is_file():
                self._helper("chunks", str(p), *parts, what=name)
            return p
        if name.startswith("dmodel:"):
            kind = name.split(":", 1)[1]
            p = r / "damaged_models" / kind
            if not p.exists():
                p.parent.mkdir(exist_ok=True)
                self._helper("damage_model", str(self.path("model")), str(p), kind, what=name)
            return p
        if name.startswith("ddata:"):
            kind = name.split(":", 1)[1]
            p = r / "damaged_data" / f"{kind}.h5"
            if not p.exists():
                p.parent.mkdir(exist_ok=True)
                self._helper("damage_data", str(self.path("data")), str(p), kind, what=name)
            return p
        if name.startswith("run:"):
            kind = name.split(":", 1)[1]
            p = r / "runs" / kind
            if (p / "run.json").is_file() and ((p / "results.json").is_file() or (p / "summary.json").is_file()):
                return p
            shutil.rmtree(p, ignore_errors=True)
            p.parent.mkdir(exist_ok=True)
            m, d = str(self.path("model")), str(self.path("data"))
            sub = {"{M}": m, "{D}": d, "{L}": str(self.ledger), "{O}": str(p)}
            if kind == "train":
                sub["{C}"] = str(self.path("chunks"))
            stage, args = RUN_FIXTURES[kind]
            if kind == "context_length":
                sub["{SWEEP}"] = str(self.path("run:sweep"))
            self._stage(stage, [fill(a, sub) for a in args], name)
            return p
        raise FixtureError(f"unknown fixture {name}")


def fill(text: str, sub: dict) -> str:
    for k, v in sub.items():
        text = text.replace(k, v)
    return text


def clean_env(envdir: Path, ledger: Path, model: Path, data: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MINIQWEN_", "SLURM_", "LOCAL_RANK", "RANK",
                                                                      "WORLD_SIZE", "MASTER_"))}
    envdir.mkdir(parents=True, exist_ok=True)
    env.update({"MINIQWEN_LEDGER": str(ledger), "MINIQWEN_MODEL": str(model), "MINIQWEN_DATA": str(data),
                "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(envdir / "hf"),
                "XDG_CACHE_HOME": str(envdir / "cache"), "MPLCONFIGDIR": str(envdir / "mpl"),
                "PYTHONDONTWRITEBYTECODE": "1"})
    return env


# ======================================================================================= stage base options

def base(stage: str) -> list[list]:
    """The small, legal option set of ``stage`` a case starts from ([option, value-or-None] pairs)."""
    run = [["--model", "{M}"], ["--data", "{D}"], ["--out", "{O}"], ["--ledger", "{L}"], ["--device", "cpu"],
           ["--precision", "float32"]]
    fc = [["--limit", "2"], ["--context-steps", "8"], ["--horizon", "3"], ["--plots", "0"],
          ["--gen-batch-size", "2"]]
    tr = [["--batch-size", "2"], ["--context-length", "48"], ["--eval-batches", "1"], ["--eval-every", "0"],
          ["--checkpoint-every", "1"], ["--max-steps", "2"], ["--no-progress", None]]
    if stage == "baseline":
        return run + fc + [["--loss-limit", "0"], ["--no-progress", None]]
    if stage == "classical":
        return [["--data", "{D}"], ["--out", "{O}"], ["--ledger", "{L}"], ["--limit", "2"], ["--context-steps", "8"],
                ["--horizon", "3"], ["--plots", "0"], ["--orders", "1,2"], ["--no-ode", None]]
    if stage == "lora_default":
        return run + fc + tr + [["--lr", "1e-3"], ["--rank", "2"]]
    if stage == "sweep":
        return run + fc + tr + [["--lrs", "1e-3,2e-3"], ["--ranks", "2"]]
    if stage == "context_length":
        return run + fc + [x for x in tr if x[0] != "--context-length"] + [["--lr", "1e-3"], ["--rank", "2"],
                                                                          ["--contexts", "32,48"]]
    if stage == "search":
        return run + fc + tr + [["--lrs", "1e-3,2e-3"], ["--ranks", "2"], ["--min-steps", "1"], ["--eta", "2"],
                                ["--rungs", "2"]]
    if stage == "final":
        return run + fc + [x if x[0] != "--eval-every" else ["--eval-every", "1"] for x in tr] + [
            ["--lr", "1e-3"], ["--rank", "2"], ["--peer-indices", "none"], ["--orders", "1,2"]]
    if stage == "forecast":
        return [["--data", "{D}"], ["--index", "33"], ["--model", "{M}"], ["--device", "cpu"],
                ["--precision", "float32"], ["--context-steps", "8"], ["--horizon", "3"], ["--out", "{O}"],
                ["--no-progress", None]]
    if stage == "flops":
        return [["--out", "{O}"], ["--ledger", "{L}"], ["--model", "{M}"]]
    if stage == "benchmark":
        return [["--model", "{M}"], ["--data", "{D}"], ["--device", "cpu"], ["--sections", "peak"],
                ["--peak-size", "64"], ["--bandwidth-mib", "1"], ["--repeats", "1"], ["--out", "{O}"]]
    if stage == "train":
        return [["--model", "{M}"], ["--train-chunks", "{C}"], ["--out", "{O}"], ["--ledger", "{L}"],
                ["--device", "cpu"], ["--precision", "float32"], ["--context-length", "16"], ["--batch-size", "2"],
                ["--checkpoint-every", "1"], ["--eval-every", "0"], ["--no-progress", None], ["--rank", "2"],
                ["--lr", "0.01"], ["--max-steps", "2"]]
    if stage == "report":
        return [["--results", "{W}/res"], ["--ledger", "{W}/res/flops_ledger.jsonl"], ["--out", "{W}/R.md"]]
    raise KeyError(stage)


def argv_of(stage: str, set_: list | tuple = (), drop: tuple = (), extra: list | tuple = ()) -> list[str]:
    """``base(stage)`` with options replaced in place (``set_``: (option, value-or-None)), removed (``drop``) and
    appended (``extra``: raw argv words)."""
    pairs = [list(p) for p in base(stage) if p[0] not in drop]
    for opt, val in set_:
        for p in pairs:
            if p[0] == opt:
                p[1] = val
                break
        else:
            pairs.append([opt, val])
    out = []
    for opt, val in pairs:
        out.append(opt)
        if val is not None:
            out.append(val)
    return out + list(extra)


_tr_fix = [["--batch-size", "2"], ["--context-length", "48"], ["--eval-batches", "1"], ["--eval-every", "0"],
           ["--checkpoint-every", "1"], ["--max-steps", "2"], ["--no-progress", None]]


def _fix_args(stage):
    return argv_of(stage)


#: finished tiny runs the run-directory cases start from: kind -> (stage, argv with {M} {D} {L} {O} ...)
RUN_FIXTURES = {
    "lora": ("lora_default", argv_of("lora_default")),
    "baseline": ("baseline", argv_of("baseline")),
    "sweep": ("sweep", argv_of("sweep")),
    "search": ("search", argv_of("search")),
    "classical": ("classical", argv_of("classical")),
    "context_length": ("context_length", argv_of("context_length", drop=("--lr", "--rank"),
                                                  extra=["--from-sweep", "{SWEEP}"])),
    "train": ("train", argv_of("train")),
    "forecast": ("forecast", argv_of("forecast")),
    "flops": ("flops", argv_of("flops")),
}


# ================================================================================================== cases

@dataclass
class Case:
    stage: str
    category: str
    name: str
    args: list[str]
    expect: str  # refuse | ok | either
    names: tuple = ()  # a refusal line must hold one of these (case-insensitive); () = any
    setup: object = None  # callable(ctx)
    check: object = None  # callable(ctx, result) -> (bool, note); None = the stage's generic check
    mutable: tuple = ()  # relative paths (prefixes) in the case dir a successful run may change
    concurrent: list | None = None  # [(stage, args), ...]: run these at once instead of one command
    tier: int = 1  # 1: the default set; 2: only with --extended
    cid: int = 0


CASES: list[Case] = []


TIER = [1]


def C(stage, category, name, args, expect, names=(), setup=None, check=None, mutable=(), concurrent=None, tier=None):
    if isinstance(names, str):
        names = (names,)
    CASES.append(Case(stage, category, name, list(args), expect, tuple(names), setup, check, tuple(mutable),
                      concurrent, tier or TIER[0]))


# ----------------------------------------------------------------------------------------------- setups

def s_chain(*fns):
    def run(ctx):
        for f in fns:
            f(ctx)
    return run


def s_files(files: dict):
    """The user's files ({relative path: text}) in the case directory."""
    def run(ctx):
        for rel, text in files.items():
            p = ctx.W / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(text, bytes):
                p.write_bytes(text)
            else:
                p.write_text(text)
    return run


def s_dir(rel):
    def run(ctx):
        (ctx.W / rel).mkdir(parents=True, exist_ok=True)
    return run


def s_fifo(rel):
    def run(ctx):
        os.mkfifo(ctx.W / rel)
    return run


def s_devnull(rel):
    """A character device like /dev/null (1,3) inside the case directory, so that a stage that writes to it
    cannot replace the machine's real /dev/null (we are root)."""
    def run(ctx):
        try:
            os.mknod(ctx.W / rel, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        except (OSError, AttributeError) as err:
            raise Skip(f"cannot make a /dev/null node here ({err})") from None
    return run


def s_unreadable(rel, text="time,prey,predator\n0,1,1\n"):
    def run(ctx):
        p = ctx.W / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
        os.chmod(p, 0)
        try:
            with open(p, "rb") as f:
                f.read(1)
        except PermissionError:
            return
        raise Skip("chmod 000 does not stop reads here (running as root)")
    return run


def s_unreadable_dir(rel):
    def run(ctx):
        p = ctx.W / rel
        p.mkdir(parents=True, exist_ok=True)
        (p / "x.txt").write_text("mine\n")
        os.chmod(p, 0)
        try:
            os.listdir(p)
        except PermissionError:
            return
        raise Skip("chmod 000 does not stop listing here (running as root)")
    return run


def s_copy(fixture, rel):
    def run(ctx):
        src = ctx.fx.path(fixture)
        dst = ctx.W / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, symlinks=True)
        else:
            shutil.copy2(src, dst)
    return run


def s_json(rel, obj):
    def run(ctx):
        p = ctx.W / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(obj) + "\n")
    return run


def s_edit_json(rel, fn):
    def run(ctx):
        p = ctx.W / rel
        obj = json.loads(p.read_text())
        obj = fn(obj) or obj
        p.write_text(json.dumps(obj, indent=2) + "\n")
    return run


def s_symlink(rel, target):
    def run(ctx):
        os.symlink(fill(target, ctx.sub), ctx.W / rel)
    return run


def s_py(fn):
    """Arbitrary setup in Python (numpy-free: the harness runs under any python3)."""
    return fn


def s_repo_py(code):
    """Python run in the repository's venv (cwd = case dir), for setups that need torch/safetensors/h5py."""
    def run(ctx):
        p = subprocess.run([str(ctx.fx.py), "-c", code], cwd=ctx.W, env=clean_env(ctx.envdir, ctx.L, ctx.M, ctx.D),
                           capture_output=True, text=True, timeout=300)
        if p.returncode != 0:
            raise FixtureError(f"setup code failed: {p.stderr.strip().splitlines()[-1:]}")
    return run


def csv_text(n, header="time,prey,predator", bad_at=None, bad_cell="abc"):
    import math
    lines = [header]
    for i in range(n):
        prey = 1 + 0.5 * math.sin(i / 6)
        pred = 1 + 0.5 * math.cos(i / 6)
        cell = f"{prey:.4f}" if bad_at != i else bad_cell
        lines.append(f"{i * 2.0},{cell},{pred:.4f}")
    return "\n".join(lines) + "\n"


def s_bigcsv(rel, n, bad_last=False):
    import math

    def run(ctx):
        p = ctx.W / rel
        with open(p, "w") as f:
            f.write("time,prey,predator\n")
            for i in range(n):
                if bad_last and i == n - 1:
                    f.write(f"{i},abc,1.0\n")
                else:  # a smooth cycle, as populations are
                    f.write(f"{i},{1 + 0.5 * math.sin(i / 6):.4f},{1 + 0.5 * math.cos(i / 6):.4f}\n")
    return run


# ----------------------------------------------------------------------------------------------- checks

def results_json(ctx, rel="out"):
    p = ctx.W / rel / "results.json"
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def generic_check(ctx, case, res):
    """What an exit 0 of ``case.stage`` must have left: its result files, and a ledger charge if it spends FLOPs."""
    st, O = case.stage, ctx.W / "out"
    if st in ("baseline", "classical", "lora_default", "sweep", "context_length", "search", "final"):
        r = results_json(ctx)
        if not isinstance(r, dict) or r.get("stage") != st:
            return False, f"no results.json of stage {st} in --out"
        rec = _json(O / "run.json")
        if not (isinstance(rec, dict) and rec.get("stage") == st and rec.get("made_by") == "miniqwen"):
            return False, "no run record of this stage in --out"
        if st in CHARGING and res["ledger_gained"] < 1:
            return False, "exit 0 but nothing was charged to the ledger"
        if not finite_json(r.get("flops")):
            return False, "results.json flops not finite"
        return True, ""
    if st == "forecast":
        return check_forecast_csv(ctx, res, 3)
    if st == "flops":
        return ((O / "flop_tables.json").is_file(), "flop_tables.json missing")
    if st == "benchmark":
        return ((O / "benchmark.json").is_file(), "benchmark.json missing")
    if st == "train":
        s = _json(O / "summary.json")
        if not isinstance(s, dict):
            return False, "no summary.json"
        if res["ledger_gained"] < 1 and "--no-ledger" not in case.args:
            return False, "exit 0 but nothing was charged to the ledger"
        return True, ""
    if st == "report":
        out = None
        for i, a in enumerate(case.args):
            if a == "--out":
                out = Path(fill(case.args[i + 1], ctx.sub))
        if out is None or not out.is_file() or out.stat().st_size < 100:
            return False, "the report file was not written"
        return True, ""
    return True, ""


def _json(p):
    try:
        return json.loads(Path(p).read_text())
    except (OSError, ValueError):
        return None


def finite_json(x):
    import math
    if isinstance(x, (int, float)):
        return math.isfinite(x)
    if isinstance(x, dict):
        return all(finite_json(v) for v in x.values())
    if isinstance(x, list):
        return all(finite_json(v) for v in x)
    return True


def check_forecast_csv(ctx, res, horizon, finite=False, rel="out"):
    import csv
    p = ctx.W / rel / "forecast.csv"
    try:
        rows = list(csv.DictReader(p.open()))
    except OSError:
        return False, "no forecast.csv"
    if len(rows) != horizon:
        return False, f"forecast.csv has {len(rows)} rows, expected {horizon}"
    if finite:
        import math
        for r in rows:
            for k in ("prey", "predator"):
                try:
                    v = float(r.get(k, ""))
                except ValueError:
                    return False, f"forecast.csv {k} {r.get(k)!r} is not a number"
                if not math.isfinite(v) or v < 0:
                    return False, f"forecast.csv {k} {v} not a finite population"
    return True, ""


def ck_forecast(h, finite=False):
    return lambda ctx, case, res: check_forecast_csv(ctx, res, h, finite)


def ck_and(*checks):
    def run(ctx, case, res):
        for c in checks:
            ok, note = c(ctx, case, res)
            if not ok:
                return ok, note
        return True, ""
    return run


def ck_generic(ctx, case, res):
    return generic_check(ctx, case, res)


def ck_steps(n, rel="out"):
    def run(ctx, case, res):
        s = _json(ctx.W / rel / "training" / "summary.json") or _json(ctx.W / rel / "summary.json")
        got = s.get("steps") if isinstance(s, dict) else None
        return (got == n, f"training summary steps={got}, expected {n}")
    return run


def ck_record_stage(stage, rel="out"):
    def run(ctx, case, res):
        rec = _json(ctx.W / rel / "run.json")
        got = rec.get("stage") if isinstance(rec, dict) else None
        return (got == stage, f"--out run record stage={got}, expected {stage}")
    return run


def ck_shard_points(ctx, case, res):
    """A shard writes its finished points (results.json comes from --collect)."""
    pts = sorted((ctx.W / "out" / "points").glob("*/point.json"))
    if not pts:
        return False, "no finished point (points/*/point.json) in --out"
    if res["ledger_gained"] < 1:
        return False, "exit 0 but nothing was charged to the ledger"
    return True, ""


def ck_no_charge(ctx, case, res):
    return (res["ledger_gained"] == 0, f"charged {res['ledger_gained']} ledger line(s) for a run that spends none")


def ck_report_mentions(*words):
    def run(ctx, case, res):
        text = (ctx.W / "R.md").read_text(errors="replace") if (ctx.W / "R.md").is_file() else ""
        missing = [w for w in words if w not in text]
        return (not missing, f"report lacks {missing}")
    return run


# ============================================================================================ the catalogue

BAD = {  # the value classes the brief names
    "neg": "-1", "zero": "0", "huge": "1e30", "overflow": "1e400", "nan": "nan", "inf": "inf",
    "arabic": "\u0661e-4", "fullwidth": "\uff13", "hex": "0x10", "empty": "", "list": "1,2",
}


def numeric(stage, opt, values, names=None, extra_set=(), category="bad-number", core=3):
    """One case per value: ``values`` = [(value, expect), ...] (expect refuse/ok/either); the first ``core`` are
    in the default set, the others only with --extended."""
    for i, (val, expect) in enumerate(values):
        C(stage, category, f"{opt} {val!r}", argv_of(stage, set_=[*extra_set, (opt, val)]), expect,
          names or (opt,), tier=1 if i < core else 2)


R, OK, E = "refuse", "ok", "either"


def catalogue():
    # ------------------------------------------------------------------------------------------ baseline
    st = "baseline"
    numeric(st, "--limit", [("", R), ("0x10", R), ("-1", R), ("1e30", R), ("\uff13", R), ("100000", E)])
    numeric(st, "--context-steps", [("0", R), ("-1", R), ("nan", R), ("1e400", R), ("100000", R), ("1,2", R)])
    numeric(st, "--horizon", [("\u0661", R), ("inf", R), ("0", R), ("1.5", R), ("100000", R)])
    numeric(st, "--gen-batch-size", [("0", R), ("1e30", R), ("\uff13", R), ("100000", E)])
    numeric(st, "--decimals", [("-1", R), ("1e30", R), ("nan", R), ("50", E)])
    numeric(st, "--samples", [("1,2", R), ("0", R), ("1e400", R), ("-2", R)])
    numeric(st, "--temperature", [("nan", R), ("-1", R), ("inf", R), ("1e30", E), ("0", E)],
            extra_set=[("--samples", "2")])
    numeric(st, "--top-p", [("0", R), ("1.5", R), ("nan", R), ("", R), ("1e-30", E)], extra_set=[("--samples", "2")])
    numeric(st, "--scale-quantile", [("\u0661e-4", R), ("2", R), ("0", E), ("nan", R), ("-1", R)])
    numeric(st, "--scale-target", [("0", R), ("1e30", R), ("inf", R), ("-1", R), ("0x10", R)])
    numeric(st, "--seed", [("-1", R), ("1e30", R), (str(2 ** 40), R), ("\uff13", R), ("0x10", R)])
    numeric(st, "--plots", [("-1", R), ("nan", R), ("1e400", R)])
    numeric(st, "--loss-limit", [("-1", R), ("\uff13", R), ("nan", R), ("all", OK)])
    numeric(st, "--loss-context-length", [("0", R), ("1e400", R), ("100000", R)], extra_set=[("--loss-limit", "1")])
    numeric(st, "--loss-batch-size", [("0", R), ("-1", R)], extra_set=[("--loss-limit", "1")])
    C(st, "bad-choice", "--device banana", argv_of(st, set_=[("--device", "banana")]), R, "--device")
    C(st, "bad-choice", "--device cuda (none here)", argv_of(st, set_=[("--device", "cuda")]), E, "--device")
    C(st, "bad-choice", "--split nope", argv_of(st, set_=[("--split", "nope")]), R, "--split")
    C(st, "bad-choice", "--precision half", argv_of(st, set_=[("--precision", "half")]), R, "--precision")
    C(st, "bad-choice", "abbreviated --lim", argv_of(st, drop=("--limit",), extra=["--lim", "2"]), R, "--lim")
    C(st, "bad-choice", "unknown option --banana", argv_of(st, extra=["--banana", "3"]), R, "--banana")
    C(st, "bad-choice", "--preset gpu", argv_of(st, extra=["--preset", "gpu"]), R, "--preset")
    C(st, "legal", "plain tiny run", argv_of(st), OK)
    C(st, "legal", "--encoding integer --scaling series", argv_of(st, set_=[("--encoding", "integer"),
                                                                            ("--scaling", "series")]), OK)
    C(st, "legal", "--precision bfloat16", argv_of(st, set_=[("--precision", "bfloat16")]), OK)
    C(st, "legal", "--split test --samples 3", argv_of(st, set_=[("--split", "test"), ("--samples", "3")]), OK)
    C(st, "conflict", "--samples 1 --temperature 0.5 (temperature without sampling)",
      argv_of(st, set_=[("--temperature", "0.5")]), E, "--temperature")
    C(st, "conflict", "--resume --overwrite together", argv_of(st, extra=["--resume", "--overwrite"]), R,
      ("--resume", "--overwrite"))
    C(st, "absurd", "--limit 0", argv_of(st, set_=[("--limit", "0")]), E, "--limit")
    paths_for_model_stage(st)
    data_damage(st, ["truncated", "nan_values", "wrong_shape_3species", "time_mismatch", "time_decreasing",
                     "one_system", "few_steps", "all_zero", "huge_values", "not_hdf5", "negative_values",
                     "empty_file", "all_nan", "inf_values", "wrong_shape_2d", "int_dtype", "string_dtype",
                     "no_time", "no_trajectories"], core=10)
    model_damage(st, ["missing_key", "wrong_shape", "nan_tensor", "truncated_safetensors", "no_tokenizer",
                      "tokenizer_garbage", "config_garbage", "no_config", "config_zero_layers",
                      "config_heads_not_dividing", "config_vocab_smaller", "config_huge_positions",
                      "inf_tensor", "extra_key", "int_tensor", "empty_safetensors", "no_safetensors",
                      "config_empty", "config_list", "config_wrong_hidden", "config_negative_heads",
                      "config_nan_eps", "config_model_type"], core=12)
    rundir_common(st, "baseline")

    # ------------------------------------------------------------------------------------------ classical
    st = "classical"
    for val, exp in [("0", R), ("-1", R), ("1,,2", R), ("1e30", R), ("\uff13", R), ("", R), ("1,2,", R),
                     ("nan", R), ("100000", E), ("0x10", R), ("1;2", R)]:
        C(st, "bad-list", f"--orders {val!r}", argv_of(st, set_=[("--orders", val)]), exp, "--orders")
    for val, exp in [("0", R), ("1_0", R), ("", R), ("100", E), ("-3", R), ("\u0662", R)]:
        C(st, "bad-list", f"--parrot-lengths {val!r}", argv_of(st, extra=["--parrot-lengths", val]), exp,
          "--parrot-lengths")
    for val, exp in [("test,banana", R), ("", R), ("validation,validation", E), ("train", E)]:
        C(st, "bad-list", f"--splits {val!r}", argv_of(st, extra=["--splits", val]), exp, "--splits")
    numeric(st, "--context-steps", [("1", E), ("0", R), ("nan", R), ("100000", R)])
    numeric(st, "--horizon", [("0", R), ("-1", R), ("1e400", R)])
    numeric(st, "--limit", [("-1", R), ("\uff13", R)])
    C(st, "conflict", "--split train --splits test", argv_of(st, extra=["--split", "train", "--splits", "test"]),
      R, ("--split",))
    C(st, "legal", "plain run, no ODE", argv_of(st), OK, check=ck_and(ck_generic, ck_no_charge))
    C(st, "legal", "--log with the ODE", argv_of(st, drop=("--no-ode",), extra=["--log"]), OK,
      check=ck_and(ck_generic, ck_no_charge))
    for kind in ["truncated", "nan_values", "negative_values", "wrong_shape_3species", "time_decreasing",
                 "one_system", "few_steps", "all_zero", "huge_values", "no_time"]:
        C(st, "damaged-data", f"--data {kind}.h5", argv_of(st, set_=[("--data", "{W}/lv_damaged.h5")]),
          _data_expect(kind), ("lv_damaged.h5", "--data", "trajector", "time"),
          setup=s_copy(f"ddata:{kind}", "lv_damaged.h5"))
    paths_data_only(st)
    rundir_common(st, "classical")

    # ------------------------------------------------------------------------------------------ lora_default
    st = "lora_default"
    numeric(st, "--lr", [(v, R) for k, v in BAD.items() if k not in ("huge",)] + [("1e30", E)], core=99)
    numeric(st, "--rank", [("0", R), ("-2", R), ("1e30", R), ("\uff13", R), ("1.5", R), ("100000", R), ("", R)])
    numeric(st, "--lora-alpha", [("0", R), ("nan", R), ("1e30", R), ("-1", R), ("1e-30", E)])
    numeric(st, "--batch-size", [("0", R), ("1e400", R), ("100000", R), ("1,2", R)])
    numeric(st, "--context-length", [("1", R), ("0", R), ("100000", R), ("\uff13\uff12", R)])
    numeric(st, "--max-steps", [("0", R), ("-1", R), ("\u0662", R), ("1e30", R), ("1000000000", E)])
    numeric(st, "--stride", [("0", R), ("-5", R), ("nan", R)])
    numeric(st, "--weight-decay", [("1e30", R), ("nan", R), ("-1", R), ("inf", R)])
    numeric(st, "--max-grad-norm", [("-1", R), ("nan", R), ("0", E), ("inf", E)])
    numeric(st, "--warmup-steps", [("-1", R), ("1e30", R), ("100000", E)])
    numeric(st, "--eval-every", [("-1", R), ("nan", R)])
    numeric(st, "--eval-batches", [("-1", R), ("100000", E)])
    numeric(st, "--checkpoint-every", [("0", R), ("-1", R)])
    numeric(st, "--early-stop", [("-1", R), ("2", R)], names=("--early-stop", "--eval-every"))
    numeric(st, "--train-limit", [("-1", R), ("0", R), ("100000", E), ("1", E)])
    numeric(st, "--targets", [("nonsense", R), (",", R), ("", R), ("q_proj,q_proj", E), ("lm_head", E)])
    numeric(st, "--scale-target", [("1e30", R)])
    numeric(st, "--decimals", [("1e30", R)])
    numeric(st, "--seed", [("4294967296", R)])
    C(st, "bad-choice", "--lr-schedule bogus", argv_of(st, extra=["--lr-schedule", "bogus"]), R, "--lr-schedule")
    C(st, "bad-choice", "--loss-vocabulary bogus", argv_of(st, extra=["--loss-vocabulary", "bogus"]), R,
      "--loss-vocabulary")
    C(st, "legal", "plain tiny run", argv_of(st), OK)
    C(st, "legal", "--loss-vocabulary numeric --lr-schedule cosine --head-bias",
      argv_of(st, extra=["--loss-vocabulary", "numeric", "--lr-schedule", "cosine", "--head-bias"]), OK)
    C(st, "legal", "--select-by forecast --eval-every 1 --restore-best",
      argv_of(st, set_=[("--eval-every", "1")], extra=["--select-by", "forecast", "--restore-best"]), OK)
    C(st, "legal", "--preset cpu with explicit small values", argv_of(st, extra=["--preset", "cpu"],
                                                                     set_=[("--eval-every", "1")]), OK)
    paths_for_model_stage(st, few=True)
    data_damage(st, ["truncated", "nan_values", "one_system", "few_steps", "all_zero"])
    model_damage(st, ["missing_key", "nan_tensor", "no_tokenizer", "config_garbage", "config_vocab_smaller"])
    rundir_common(st, "lora")
    resume_cases()

    # ------------------------------------------------------------------------------------------ sweep
    st = "sweep"
    for val, exp in [("", R), ("1,,2", R), (",", R), ("nan", R), ("inf", R), ("\u0661e-4", R), ("1e400", R),
                     ("-1e-3", R), ("0", R), ("1,2", E), ("1e-3,1e-3", E), ("1e-3;2e-3", R), ("0x10", R)]:
        C(st, "bad-list", f"--lrs {val!r}", argv_of(st, set_=[("--lrs", val)]), exp, "--lrs")
    for val, exp in [("0", R), ("2,\u0664", R), ("1.5", R), ("1,2", OK), ("", R), ("-2", R), ("\uff13", R)]:
        C(st, "bad-list", f"--ranks {val!r}", argv_of(st, set_=[("--ranks", val)]), exp, "--ranks")
    for val, exp in [("2/2", R), ("0/0", R), ("-1/2", R), ("a/b", R), ("1", R), ("0/1", OK)]:
        C(st, "bad-number", f"--shard {val!r}", argv_of(st, extra=["--shard", val]), exp, "--shard",
          check=ck_shard_points if exp == OK else None)
    C(st, "bad-env", "SLURM_ARRAY_TASK_ID=5 SLURM_ARRAY_TASK_COUNT=2 (env)",
      ["SLURM_ARRAY_TASK_ID=5", "SLURM_ARRAY_TASK_COUNT=2", "!"] + argv_of(st), R, ("SLURM", "--shard"))
    C(st, "run-dir", "--collect into an empty --out", argv_of(st, extra=["--collect"]), R, ("--collect", "out"))
    C(st, "conflict", "--collect --shard 0/2", argv_of(st, extra=["--collect", "--shard", "0/2"]), R,
      ("--collect", "--shard"))
    C(st, "legal", "plain tiny sweep", argv_of(st), OK)
    numeric(st, "--max-steps", [("0", R), ("nan", R)])
    numeric(st, "--lora-alpha", [("30000", R)])
    numeric(st, "--weight-decay", [("1e30", R)], category="absurd")
    paths_for_model_stage(st, few=True)
    rundir_common(st, "sweep")

    # ------------------------------------------------------------------------------------------ context_length
    st = "context_length"
    for val, exp in [("1,2", R), ("", R), ("0", R), ("32,1e3", R), ("100000", R), ("32,\u0664\u0668", R),
                     ("32,,48", R), ("-32", R), ("32,32", E), ("nan", R), ("257", R), ("32,48,", R)]:
        C(st, "bad-list", f"--contexts {val!r}", argv_of(st, set_=[("--contexts", val)]), exp, "--contexts")
    numeric(st, "--lr", [("0", R), ("nan", R), ("", R)])
    numeric(st, "--rank", [("0", R), ("\uff13", R)])
    C(st, "bad-path", "--from-sweep missing", argv_of(st, drop=("--lr", "--rank"),
                                                      extra=["--from-sweep", "{W}/nope"]), R, "--from-sweep")
    C(st, "bad-path", "--from-sweep a file", argv_of(st, drop=("--lr", "--rank"),
                                                     extra=["--from-sweep", "{W}/f.txt"]), R, "--from-sweep",
      setup=s_files({"f.txt": "mine\n"}))
    C(st, "conflict", "--from-sweep a lora_default run", argv_of(st, drop=("--lr", "--rank"),
                                                                 extra=["--from-sweep", "{W}/lora"]), R,
      ("--from-sweep", "lora_default"), setup=s_copy("run:lora", "lora"))
    C(st, "conflict", "--from-sweep a user's dir with results.json {stage: sweep}",
      argv_of(st, drop=("--lr", "--rank"), extra=["--from-sweep", "{W}/fake"]), R, ("--from-sweep", "run record"),
      setup=s_json("fake/results.json", {"stage": "sweep", "details": {"selection": {"chosen": {"lr": 1,
                                                                                               "rank": 2}}}}))
    C(st, "conflict", "--from-sweep DIR --lr 5e-3", argv_of(st, set_=[("--lr", "5e-3")], drop=("--rank",),
                                                            extra=["--from-sweep", "{W}/sweep"]), E,
      ("--lr", "--from-sweep"), setup=s_copy("run:sweep", "sweep"))
    C(st, "legal", "--from-sweep a finished sweep", argv_of(st, drop=("--lr", "--rank"),
                                                            extra=["--from-sweep", "{W}/sweep"]), OK,
      setup=s_copy("run:sweep", "sweep"))
    C(st, "conflict", "--context-length 48 beside --contexts", argv_of(st, extra=["--context-length", "48"]), E,
      ("--context-length", "--contexts"))
    C(st, "legal", "plain tiny study", argv_of(st), OK)
    rundir_common(st, "context_length", few=True)

    # ------------------------------------------------------------------------------------------ search
    st = "search"
    for val, exp in [("nan", R), ("", R), ("1,,2", R), ("1e-4,inf", R), ("\u0661e-4", R)]:
        C(st, "bad-list", f"--lrs {val!r}", argv_of(st, set_=[("--lrs", val)]), exp, "--lrs")
    for val, exp in [("0", R), ("1,2", OK), ("2,\u0664", R), ("", R)]:
        C(st, "bad-list", f"--ranks {val!r}", argv_of(st, set_=[("--ranks", val)]), exp, "--ranks")
    numeric(st, "--min-steps", [("0", R), ("-1", R), ("1e30", R), ("nan", R)])
    numeric(st, "--eta", [("1", R), ("0", R), ("1.5", E), ("nan", R), ("1e400", R)])
    numeric(st, "--rungs", [("0", R), ("-1", R), ("100", E), ("\uff13", R)])
    C(st, "absurd", "--rungs 3 --eta 1000 --min-steps 1000", argv_of(st, set_=[("--rungs", "3"), ("--eta", "1000"),
                                                                              ("--min-steps", "1000")]), E,
      ("--rungs", "--eta", "--min-steps", "--max-steps", "budget", "FLOP"))
    C(st, "legal", "plain tiny search", argv_of(st), OK)
    C(st, "resume", "--resume into an empty --out", argv_of(st, extra=["--resume"]), R, ("--resume", "nothing"))
    C(st, "resume", "--resume into a user's dir", argv_of(st, extra=["--resume"]), R, ("--resume", "out"),
      setup=s_files({"out/README.md": "# my notes\n", "out/training/notes.txt": "keep\n"}))
    C(st, "resume", "--resume a sweep's run", argv_of(st, extra=["--resume"]), R, ("sweep", "--resume"),
      setup=s_copy("run:sweep", "out"))
    C(st, "resume", "--resume a finished search with the same settings", argv_of(st, extra=["--resume"]), E,
      ("--resume", "finished"), setup=s_copy("run:search", "out"), mutable=("out",))
    C(st, "resume", "--resume a finished search with --lrs changed",
      argv_of(st, set_=[("--lrs", "1e-3,3e-3")], extra=["--resume"]), R, ("--lrs", "lr", "differ", "settings"),
      setup=s_copy("run:search", "out"))
    paths_for_model_stage(st, few=True)
    rundir_common(st, "search", few=True)

    # ------------------------------------------------------------------------------------------ final
    st = "final"
    fs = ("--lr", "--rank")
    C(st, "conflict", "--from-search DIR --lr 1e-3", argv_of(st, drop=("--rank",),
                                                             extra=["--from-search", "{W}/search"]), R,
      ("--lr", "--from-search"), setup=s_copy("run:search", "search"))
    C(st, "conflict", "--from-search DIR --rank 4", argv_of(st, set_=[("--rank", "4")], drop=("--lr",),
                                                            extra=["--from-search", "{W}/search"]), R,
      ("--rank", "--from-search"), setup=s_copy("run:search", "search"))
    C(st, "conflict", "--from-search DIR --context-length 32",
      argv_of(st, set_=[("--context-length", "32")], drop=fs, extra=["--from-search", "{W}/search"]), R,
      ("--context-length", "--from-search"), setup=s_copy("run:search", "search"))
    C(st, "conflict", "--from-search pointing to a sweep", argv_of(st, drop=fs, extra=["--from-search", "{W}/sweep"]),
      R, ("--from-search", "sweep"), setup=s_copy("run:sweep", "sweep"))
    C(st, "conflict", "--from-sweep pointing to a search", argv_of(st, drop=fs, extra=["--from-sweep", "{W}/search"]),
      R, ("--from-sweep", "search"), setup=s_copy("run:search", "search"))
    C(st, "conflict", "--from-context pointing to a sweep",
      argv_of(st, drop=fs, extra=["--from-context", "{W}/sweep"]), R, ("--from-context", "sweep"),
      setup=s_copy("run:sweep", "sweep"))
    C(st, "conflict", "--from-search and --from-sweep together",
      argv_of(st, drop=fs, extra=["--from-search", "{W}/search", "--from-sweep", "{W}/sweep"]), R,
      ("--from-search", "--from-sweep"), setup=s_chain(s_copy("run:search", "search"), s_copy("run:sweep", "sweep")))
    C(st, "bad-path", "--from-search missing", argv_of(st, drop=fs, extra=["--from-search", "{W}/nope"]), R,
      "--from-search")
    C(st, "bad-path", "--from-search a user's dir", argv_of(st, drop=fs, extra=["--from-search", "{W}/mine"]), R,
      "--from-search", setup=s_files({"mine/results.json": '{"stage": "search"}\n'}))
    C(st, "bad-path", "--from-search an unfinished search (no results.json)",
      argv_of(st, drop=fs, extra=["--from-search", "{W}/search"]), R, ("--from-search", "unfinished", "results"),
      setup=s_chain(s_copy("run:search", "search"), lambda ctx: (ctx.W / "search" / "results.json").unlink()))
    C(st, "bad-path", "--from-search whose results.json is garbage",
      argv_of(st, drop=fs, extra=["--from-search", "{W}/search"]), R, ("--from-search", "results.json", "search"),
      setup=s_chain(s_copy("run:search", "search"), s_files({"search/results.json": "{garbage"})))
    C(st, "conflict", "--continue-search without --from-search", argv_of(st, extra=["--continue-search"]), E,
      ("--continue-search", "--from-search"))
    C(st, "legal", "--from-search a finished search", argv_of(st, drop=fs, extra=["--from-search", "{W}/search"]),
      OK, setup=s_copy("run:search", "search"))
    C(st, "legal", "explicit --lr --rank --context-length", argv_of(st), OK)
    numeric(st, "--score-limit", [("0", R), ("-1", R), ("nan", R)], extra_set=[("--select-by", "forecast")])
    numeric(st, "--peer-indices", [("5-2", R), ("a-b", R), ("0-100000", R), ("", R), ("3-3", E)])
    numeric(st, "--orders", [("1,-2", R), ("1.5,2", R), ("0", R)])
    numeric(st, "--eval-every", [("0", R)])
    numeric(st, "--lr", [("1e400", R), ("\u0661e-4", R)])
    paths_for_model_stage(st, few=True)
    rundir_common(st, "final", few=True)

    # ------------------------------------------------------------------------------------------ forecast
    forecast_cases()
    # ------------------------------------------------------------------------------------------ flops
    flops_cases()
    # ------------------------------------------------------------------------------------------ benchmark
    benchmark_cases()
    # ------------------------------------------------------------------------------------------ train
    train_cases()
    # ------------------------------------------------------------------------------------------ report
    report_cases()
    concurrent_cases()


def _data_expect(kind):
    return {"huge_values": E, "int_dtype": E, "one_system": R, "few_steps": R, "all_zero": R}.get(kind, R)


def paths_for_model_stage(st, few=False):
    """Bad --model / --data / --ledger / --out paths."""
    C(st, "bad-path", "--model missing dir", argv_of(st, set_=[("--model", "{W}/no-such-model")]), R,
      ("--model", "no-such-model"))
    C(st, "bad-path", "--data missing", argv_of(st, set_=[("--data", "{W}/nope.h5")]), R, ("--data", "nope.h5"))
    C(st, "bad-path", "--data a directory", argv_of(st, set_=[("--data", "{W}/dd")]), R, ("--data", "dd"),
      setup=s_dir("dd"))
    C(st, "bad-path", "--data a FIFO", argv_of(st, set_=[("--data", "{W}/fifo.h5")]), R, ("--data", "fifo.h5"),
      setup=s_fifo("fifo.h5"))
    C(st, "bad-path", "--ledger a directory", argv_of(st, set_=[("--ledger", "{W}/ld")]), R, ("--ledger", "ld"),
      setup=s_dir("ld"))
    if few:
        return
    C(st, "bad-path", "--model a file", argv_of(st, set_=[("--model", "{W}/m.txt")]), R, ("--model", "m.txt"),
      setup=s_files({"m.txt": "not a model\n"}))
    C(st, "bad-path", "--model /dev/null", argv_of(st, set_=[("--model", "/dev/null")]), R, ("--model", "/dev/null"))
    C(st, "bad-path", "--model a FIFO", argv_of(st, set_=[("--model", "{W}/mfifo")]), R, ("--model", "mfifo"),
      setup=s_fifo("mfifo"))
    C(st, "bad-path", "--model an empty dir", argv_of(st, set_=[("--model", "{W}/emptym")]), R,
      ("--model", "emptym", "config.json"), setup=s_dir("emptym"))
    C(st, "bad-path", "--data /dev/null", argv_of(st, set_=[("--data", "/dev/null")]), R, ("--data", "/dev/null"))
    C(st, "bad-path", "--data chmod 000", argv_of(st, set_=[("--data", "{W}/locked.h5")]), R,
      ("--data", "locked.h5"), setup=s_unreadable("locked.h5"))
    C(st, "bad-path", "--data a CSV file", argv_of(st, set_=[("--data", "{W}/s.csv")]), R, ("--data", "s.csv"),
      setup=s_files({"s.csv": csv_text(30)}))
    C(st, "bad-path", "--ledger a FIFO", argv_of(st, set_=[("--ledger", "{W}/lfifo")]), R, ("--ledger", "lfifo"),
      setup=s_fifo("lfifo"))
    C(st, "bad-path", "--ledger a /dev/null node", argv_of(st, set_=[("--ledger", "{W}/devnull")]), R,
      ("--ledger", "devnull"), setup=s_devnull("devnull"))
    C(st, "bad-path", "--ledger a user's text file", argv_of(st, set_=[("--ledger", "{W}/notes.txt")]), R,
      ("--ledger", "notes.txt"), setup=s_files({"notes.txt": "my shopping list\neggs\n"}))
    C(st, "bad-path", "--ledger under a file", argv_of(st, set_=[("--ledger", "{W}/notes.txt/l.jsonl")]), R,
      ("--ledger", "notes.txt"), setup=s_files({"notes.txt": "mine\n"}))
    C(st, "bad-path", "--out a file", argv_of(st, set_=[("--out", "{W}/o.txt")]), R, ("--out", "o.txt"),
      setup=s_files({"o.txt": "mine\n"}))
    C(st, "bad-path", "--out under a file", argv_of(st, set_=[("--out", "{W}/o.txt/run")]), R, ("--out", "o.txt"),
      setup=s_files({"o.txt": "mine\n"}))
    C(st, "bad-path", "--out a dangling symlink", argv_of(st), R, ("--out", "symbolic", "link"),
      setup=s_symlink("out", "{W}/nowhere"))
    C(st, "bad-path", "--out a /dev/null node", argv_of(st, set_=[("--out", "{W}/devnull")]), R,
      ("--out", "devnull"), setup=s_devnull("devnull"))
    C(st, "bad-path", "--out an unreadable dir of the user's", argv_of(st, set_=[("--out", "{W}/locked")]), R,
      ("--out", "locked"), setup=s_unreadable_dir("locked"))


def paths_data_only(st):
    C(st, "bad-path", "--data missing", argv_of(st, set_=[("--data", "{W}/nope.h5")]), R, ("--data", "nope.h5"))
    C(st, "bad-path", "--data a directory", argv_of(st, set_=[("--data", "{W}/dd")]), R, ("--data", "dd"),
      setup=s_dir("dd"))
    C(st, "bad-path", "--data a FIFO", argv_of(st, set_=[("--data", "{W}/fifo.h5")]), R, ("--data", "fifo.h5"),
      setup=s_fifo("fifo.h5"))
    C(st, "bad-path", "--data /dev/null", argv_of(st, set_=[("--data", "/dev/null")]), R, ("--data", "/dev/null"))
    C(st, "bad-path", "--data chmod 000", argv_of(st, set_=[("--data", "{W}/locked.h5")]), R,
      ("--data", "locked.h5"), setup=s_unreadable("locked.h5"))
    C(st, "bad-path", "--ledger a user's text file", argv_of(st, set_=[("--ledger", "{W}/notes.txt")]), E,
      ("--ledger", "notes.txt"), setup=s_files({"notes.txt": "my shopping list\neggs\n"}))
    C(st, "bad-path", "--out a file", argv_of(st, set_=[("--out", "{W}/o.txt")]), R, ("--out", "o.txt"),
      setup=s_files({"o.txt": "mine\n"}))


def data_damage(st, kinds, core=None):
    for i, kind in enumerate(kinds):
        C(st, "damaged-data", f"--data {kind}.h5", argv_of(st, set_=[("--data", "{W}/lv_damaged.h5")]),
          _data_expect(kind), ("lv_damaged.h5", "--data", "trajector", "time", "--limit", "--context-steps",
                               "--horizon", "split"),
          setup=s_copy(f"ddata:{kind}", "lv_damaged.h5"), tier=1 if core is None or i < core else 2)


def model_damage(st, kinds, core=None):
    for i, kind in enumerate(kinds):
        expect = E if kind in ("extra_key",) else R
        C(st, "damaged-model", f"--model damaged ({kind})", argv_of(st, set_=[("--model", "{W}/dm")]), expect,
          ("dm", "--model", "config", "tokenizer", "safetensors", "weights", "model"),
          setup=s_copy(f"dmodel:{kind}", "dm"), tier=1 if core is None or i < core else 2)


USER_DIR = {"out/README.md": "# my own notes\n", "out/training/notes.txt": "do not delete\n"}


def rundir_common(st, fixture, few=False):
    """--out holding the user's files, with and without --overwrite; a user's results.json; --overwrite of a
    finished run of this stage."""
    C(st, "run-dir", "--out holds the user's README.md + training/notes.txt", argv_of(st), R, ("--out", "out"),
      setup=s_files(USER_DIR))
    C(st, "run-dir", "--out holds the user's README.md + training/notes.txt, --overwrite",
      argv_of(st, extra=["--overwrite"]), R, ("--out", "out", "--overwrite"), setup=s_files(USER_DIR))
    C(st, "run-dir", "--out holds a user's results.json {stage: x}, --overwrite", argv_of(st, extra=["--overwrite"]),
      R, ("--out", "out", "--overwrite"), setup=s_json("out/results.json", {"stage": "x"}))
    if few:
        return
    C(st, "run-dir", f"--out holds a user's results.json {{stage: {st}}}, --overwrite",
      argv_of(st, extra=["--overwrite"]), R, ("--out", "out", "--overwrite"),
      setup=s_json("out/results.json", {"stage": st, "settings": {}}))
    if fixture in RUN_FIXTURES:
        C(st, "run-dir", f"--out holds a finished {st} run, no --overwrite", argv_of(st), R,
          ("--out", "--overwrite", "already"), setup=s_copy(f"run:{fixture}", "out"))
        C(st, "run-dir", f"--out holds a finished {st} run, --overwrite", argv_of(st, extra=["--overwrite"]), OK,
          setup=s_copy(f"run:{fixture}", "out"), mutable=("out",))
        C(st, "run-dir", f"--out holds a finished {st} run plus the user's notes.txt, --overwrite",
          argv_of(st, extra=["--overwrite"]), R, ("--overwrite", "notes.txt", "--out"),
          setup=s_chain(s_copy(f"run:{fixture}", "out"), s_files({"out/notes.txt": "mine\n"})))
    C(st, "run-dir", "--out holds another stage's run (flops), --overwrite", argv_of(st, extra=["--overwrite"]), E,
      ("--out", "flops"), setup=s_copy("run:flops", "out"), mutable=("out",))
    C(st, "run-dir", "--out holds a damaged run record, --overwrite", argv_of(st, extra=["--overwrite"]), R,
      ("--out", "run.json", "record"), setup=s_files({"out/run.json": "{damaged", "out/mine.txt": "keep\n"}))


def resume_cases():
    st = "lora_default"
    setup = s_copy("run:lora", "out")
    for opt, val in [("--seed", "1"), ("--decimals", "3"), ("--lr", "2e-3"), ("--rank", "4"),
                     ("--context-length", "32"), ("--batch-size", "1"), ("--targets", "q_proj"),
                     ("--encoding", "integer"), ("--scale-target", "5"), ("--lora-alpha", "8"),
                     ("--loss-vocabulary", "numeric"), ("--limit", "1")]:
        C(st, "resume", f"--resume a finished run with {opt} {val} changed, --max-steps 3",
          argv_of(st, set_=[(opt, val), ("--max-steps", "3")], extra=["--resume"]),
          E if opt == "--limit" else R, (opt, "--resume", "differ", "settings"), setup=setup,
          mutable=("out",) if opt == "--limit" else ())
    C(st, "resume", "--resume a finished run with the same settings, --max-steps 3",
      argv_of(st, set_=[("--max-steps", "3")], extra=["--resume"]), OK, setup=setup, mutable=("out",),
      check=ck_and(ck_generic, ck_steps(3)))
    C(st, "resume", "--resume a finished run, nothing changed", argv_of(st, extra=["--resume"]), E,
      ("--resume", "finished", "--max-steps"), setup=setup, mutable=("out",))
    C(st, "resume", "--resume a finished run with --max-steps 1 (fewer)",
      argv_of(st, set_=[("--max-steps", "1")], extra=["--resume"]), R, ("--max-steps", "--resume"), setup=setup)
    C(st, "resume", "--resume with other data (changed --data file)",
      argv_of(st, set_=[("--data", "{W}/other.h5"), ("--max-steps", "3")], extra=["--resume"]), R,
      ("--data", "data", "differ", "--resume"), setup=s_chain(setup, s_copy("ddata:huge_values", "other.h5")))
    C(st, "resume", "--resume into an empty --out", argv_of(st, extra=["--resume"]), R, ("--resume", "nothing"),
      setup=s_dir("out"))
    C(st, "resume", "--resume into a missing --out", argv_of(st, extra=["--resume"]), R, ("--resume", "nothing"))
    C(st, "resume", "--resume into a user's dir", argv_of(st, extra=["--resume"]), R, ("--resume", "out"),
      setup=s_files(USER_DIR))
    C(st, "resume", "--resume another stage's run (baseline)", argv_of(st, extra=["--resume"]), R,
      ("baseline", "--resume"), setup=s_copy("run:baseline", "out"))
    C(st, "resume", "--resume a run whose checkpoint is truncated",
      argv_of(st, set_=[("--max-steps", "3")], extra=["--resume"]), R, ("checkpoint", "--resume", "optimizer"),
      setup=s_chain(setup, lambda ctx: _truncate(ctx.W / "out/training/checkpoint/optimizer.safetensors")))
    C(st, "resume", "--resume a run whose training/log.jsonl is garbage",
      argv_of(st, set_=[("--max-steps", "3")], extra=["--resume"]), E, ("log.jsonl", "--resume"),
      setup=s_chain(setup, s_files({"out/training/log.jsonl": "{garbage\n"})), mutable=("out",))
    C(st, "resume", "--resume a run whose run.json is garbage", argv_of(st, extra=["--resume"]), R,
      ("run.json", "record", "--out"), setup=s_chain(setup, s_files({"out/run.json": "{garbage"})))
    for st2 in ("sweep", "baseline", "final", "context_length"):
        C(st2, "resume", "--resume a lora_default run", argv_of(st2, extra=["--resume"]), R,
          ("lora_default", "--resume"), setup=setup)
    C("baseline", "resume", "--resume into an empty --out", argv_of("baseline", extra=["--resume"]), R,
      ("--resume", "nothing"), setup=s_dir("out"))
    C("sweep", "resume", "--resume into an empty --out", argv_of("sweep", extra=["--resume"]), R,
      ("--resume", "nothing"))
    C("sweep", "resume", "--resume a finished sweep with --ranks changed",
      argv_of("sweep", set_=[("--ranks", "2,4")], extra=["--resume"]), E, ("--ranks", "--resume", "differ", "grid"),
      setup=s_copy("run:sweep", "out"), mutable=("out",))


def _truncate(p: Path):
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 3])


def forecast_cases():
    st = "forecast"
    numeric(st, "--index", [("-1", R), ("40", R), ("1e30", R), ("\uff13", R), ("", R), ("0x10", R)])
    numeric(st, "--context-steps", [("0", R), ("-1", R), ("100000", E), ("nan", R)])
    numeric(st, "--horizon", [("0", R), ("nan", R), ("1e400", R), ("100000", E)])
    numeric(st, "--samples", [("0", R), ("-1", R)])
    numeric(st, "--temperature", [("nan", R), ("-1", R)], extra_set=[("--samples", "2")])
    numeric(st, "--top-p", [("2", R), ("0", R)], extra_set=[("--samples", "2")])
    numeric(st, "--llmtime-scale", [("0", R), ("-1", R), ("nan", R), ("inf", R), ("1e30", E), ("fit", E),
                                    ("\u0661e-4", R), ("", R)])
    numeric(st, "--decimals", [("-1", R), ("1e30", R)])
    numeric(st, "--seed", [("-1", R)])
    V = [("--method", "var")]
    numeric(st, "--backtest", [("0", R), ("-1", R), ("1000", R), ("nan", R)], extra_set=V)
    numeric(st, "--backtest-step", [("0", R), ("-2", R)], extra_set=V + [("--backtest", "2")])
    numeric(st, "--methods", [("var,banana", R), ("", R), ("var,,ar", R)], extra_set=[("--backtest", "2")])
    C(st, "bad-choice", "--method banana", argv_of(st, extra=["--method", "banana"]), R, "--method")
    C(st, "conflict", "--method var --adapter DIR", argv_of(st, extra=["--method", "var", "--adapter", "{W}/ad"]),
      E, ("--adapter", "--method"), setup=s_copy_adapter())
    C(st, "conflict", "--adapter DIR --decimals 3", argv_of(st, extra=["--adapter", "{W}/ad", "--decimals", "3"]),
      E, ("--decimals", "--adapter"), setup=s_copy_adapter())
    C(st, "conflict", "--index with a CSV", argv_of(st, set_=[("--data", "{W}/s.csv")]), E, ("--index", "csv"),
      setup=s_files({"s.csv": csv_text(30)}))
    C(st, "conflict", "an HDF5 file without --index", argv_of(st, drop=("--index",)), R, ("--index",))
    C(st, "legal", "HDF5 trajectory, base model", argv_of(st), OK, check=ck_and(ck_forecast(3), ck_no_charge))
    C(st, "legal", "HDF5 trajectory --method var", argv_of(st, extra=["--method", "var"]), OK,
      check=ck_forecast(3, finite=True))
    C(st, "legal", "HDF5 trajectory with the lora adapter", argv_of(st, extra=["--adapter", "{W}/ad"]), OK,
      setup=s_copy_adapter(), check=ck_forecast(3))
    C(st, "legal", "--samples 3 on a CSV", argv_of(st, set_=[("--data", "{W}/s.csv"), ("--samples", "3")],
                                                  drop=("--index",)), OK, setup=s_files({"s.csv": csv_text(30)}),
      check=ck_forecast(3))
    C(st, "legal", "--backtest 2 --methods var,persistence on a CSV",
      argv_of(st, set_=[("--data", "{W}/s.csv")], drop=("--index",),
              extra=["--backtest", "2", "--methods", "var,persistence"]), OK,
      setup=s_files({"s.csv": csv_text(40)}), check=lambda ctx, c, r: ((ctx.W / "out" / "backtest.csv").is_file(),
                                                                      "no backtest.csv"))
    # CSV inputs
    csvs = [
        ("empty", "", R), ("header only", "time,prey,predator\n", R),
        ("one row, llm", "time,prey,predator\n0,1.0,2.0\n", E),
        ("text in cells", csv_text(30, bad_at=10), R), ("NaN cell", csv_text(30, bad_at=5, bad_cell="nan"), R),
        ("negative cell", csv_text(30, bad_at=5, bad_cell="-1.5"), R),
        ("european decimal", csv_text(30, bad_at=5, bad_cell='"1,5"'), R),
        ("missing predator column", "time,prey\n" + "".join(f"{i},1.0\n" for i in range(30)), R),
        ("ragged row", csv_text(30).replace("\n4.0,", "\n4.0,1,"), R),
        ("decreasing time", "time,prey,predator\n" + "".join(f"{30 - i},1.{i % 9},1.{i % 7}\n" for i in range(30)),
         R),
        ("byte-order mark", "\ufeff" + csv_text(30), OK),
        ("semicolon-separated", csv_text(30).replace(",", ";"), R),
        ("huge values", "time,prey,predator\n" + "".join(f"{i},{1e300 * (1 + i % 3)},{1e300}\n" for i in range(30)),
         E),
        ("all zero", "time,prey,predator\n" + "".join(f"{i},0,0\n" for i in range(30)), E),
        ("numbers header", "0,1,2\n" + "".join(f"{i},1,1\n" for i in range(30)), R),
        ("Windows line ends", csv_text(30).replace("\n", "\r\n"), OK),
    ]
    for name, text, exp in csvs:
        C(st, "csv", f"--data CSV: {name}", argv_of(st, set_=[("--data", "{W}/s.csv")], drop=("--index",)), exp,
          ("s.csv", "--data", "row", "column"), setup=s_files({"s.csv": text}),
          check=ck_forecast(3) if exp != R else None)
    C(st, "csv", "--data CSV: one row, --method var", argv_of(st, set_=[("--data", "{W}/s.csv")], drop=("--index",),
                                                             extra=["--method", "var"]), R,
      ("s.csv", "row", "var", "--context-steps"), setup=s_files({"s.csv": "time,prey,predator\n0,1.0,2.0\n"}))
    C(st, "csv", "--data CSV: one row, --method persistence",
      argv_of(st, set_=[("--data", "{W}/s.csv")], drop=("--index",), extra=["--method", "persistence"]), E,
      ("s.csv", "row"), setup=s_files({"s.csv": "time,prey,predator\n0,1.0,2.0\n"}), check=ck_forecast(3, True))
    C(st, "csv", "--data CSV: not UTF-8 (latin-1 header)",
      argv_of(st, set_=[("--data", "{W}/s.csv")], drop=("--index",)), R, ("s.csv", "UTF-8"),
      setup=s_files({"s.csv": ("time,pr\xe9y,predator\n".encode("latin-1") + csv_text(30).split("\n", 1)[1].encode())}))
    C(st, "csv", "--data CSV: 1,000,000 rows, --method var",
      argv_of(st, set_=[("--data", "{W}/big.csv")], drop=("--index",), extra=["--method", "var"]), OK,
      setup=s_bigcsv("big.csv", 1_000_000), check=ck_forecast(3, finite=True))
    C(st, "csv", "--data CSV: 1,000,000 rows, llm",
      argv_of(st, set_=[("--data", "{W}/big.csv")], drop=("--index",)), OK,
      setup=s_bigcsv("big.csv", 1_000_000), check=ck_forecast(3))
    C(st, "csv", "--data CSV: 1,000,000 rows, bad cell in the last row",
      argv_of(st, set_=[("--data", "{W}/big.csv")], drop=("--index",), extra=["--method", "var"]), R,
      ("big.csv", "row", "abc"), setup=s_bigcsv("big.csv", 1_000_000, bad_last=True))
    C(st, "csv", "--columns prey (one name)", argv_of(st, set_=[("--data", "{W}/s.csv")], drop=("--index",),
                                                      extra=["--columns", "prey"]), R, "--columns",
      setup=s_files({"s.csv": csv_text(30)}))
    C(st, "csv", "--columns a,b (absent)", argv_of(st, set_=[("--data", "{W}/s.csv")], drop=("--index",),
                                                   extra=["--columns", "a,b"]), R, ("--columns", "s.csv", "column"),
      setup=s_files({"s.csv": csv_text(30)}))
    C(st, "csv", "--time-column nosuch", argv_of(st, set_=[("--data", "{W}/s.csv")], drop=("--index",),
                                                 extra=["--time-column", "nosuch"]), R,
      ("--time-column", "nosuch", "time column"), setup=s_files({"s.csv": csv_text(30)}))
    # bad paths
    for name, val, setup in [("missing", "{W}/nope.csv", None), ("a directory", "{W}/dd", s_dir("dd")),
                             ("a FIFO", "{W}/f.csv", s_fifo("f.csv")), ("/dev/null", "/dev/null", None),
                             ("chmod 000", "{W}/locked.csv", s_unreadable("locked.csv"))]:
        C(st, "bad-path", f"--data {name}", argv_of(st, set_=[("--data", val)], drop=("--index",)), R,
          ("--data", Path(val).name, "file", "directory"), setup=setup)
    C(st, "bad-path", "--model missing", argv_of(st, set_=[("--model", "{W}/nope")]), R, ("--model", "nope"))
    C(st, "bad-path", "--model a FIFO", argv_of(st, set_=[("--model", "{W}/mf")]), R, ("--model", "mf"),
      setup=s_fifo("mf"))
    C(st, "bad-path", "--out a file", argv_of(st, set_=[("--out", "{W}/o.txt")]), R, ("--out", "o.txt"),
      setup=s_files({"o.txt": "mine\n"}))
    C(st, "bad-path", "--adapter missing", argv_of(st, extra=["--adapter", "{W}/nope"]), R, ("--adapter", "nope"))
    C(st, "bad-path", "--adapter a file", argv_of(st, extra=["--adapter", "{W}/a.txt"]), R, ("--adapter", "a.txt"),
      setup=s_files({"a.txt": "x\n"}))
    C(st, "bad-path", "--adapter an empty dir", argv_of(st, extra=["--adapter", "{W}/ea"]), R, ("--adapter", "ea"),
      setup=s_dir("ea"))
    model_damage(st, ["missing_key", "nan_tensor", "no_tokenizer", "config_garbage", "wrong_shape"])
    data_damage(st, ["truncated", "nan_values", "negative_values", "few_steps"])
    # damaged adapters
    A = "{W}/ad"
    damages = [
        ("no adapter_model.safetensors", s_rm("ad/adapter_model.safetensors"), R),
        ("no adapter_config.json", s_rm("ad/adapter_config.json"), R),
        ("no miniqwen_llmtime.json", s_rm("ad/miniqwen_llmtime.json"), E),
        ("adapter_config.json garbage", s_files({"ad/adapter_config.json": "{garbage"}), R),
        ("miniqwen_llmtime.json garbage", s_files({"ad/miniqwen_llmtime.json": "[1,"}), R),
        ("adapter_model.safetensors truncated", lambda ctx: _truncate(ctx.W / "ad/adapter_model.safetensors"), R),
        ("adapter_model.safetensors empty", s_files({"ad/adapter_model.safetensors": b""}), R),
        ("NaN in lora_B", s_adapter_tensor("nan"), R),
        ("lora_A wrong shape", s_adapter_tensor("shape"), R),
        ("missing lora tensor", s_adapter_tensor("drop"), R),
        ("extra unknown tensor", s_adapter_tensor("extra"), R),
        ("config r=8 but tensors rank 2", s_edit_json("ad/adapter_config.json", lambda c: c.update(r=8)), R),
        ("config targets nonexistent module", s_edit_json("ad/adapter_config.json",
                                                          lambda c: c.update(target_modules=["zz_proj"])), R),
        ("config peft_type PREFIX_TUNING", s_edit_json("ad/adapter_config.json",
                                                      lambda c: c.update(peft_type="PREFIX_TUNING")), R),
        ("config lora_alpha NaN", s_files({"ad/adapter_config.json": None}), R),
        ("card llmtime_scale 0", s_edit_json("ad/miniqwen_llmtime.json", lambda c: c.update(llmtime_scale=0)), R),
        ("card llmtime_scale negative", s_edit_json("ad/miniqwen_llmtime.json",
                                                    lambda c: c.update(llmtime_scale=-1.0)), R),
        ("card llmtime_scale string", s_edit_json("ad/miniqwen_llmtime.json",
                                                  lambda c: c.update(llmtime_scale="big")), R),
        ("card decimals -1", s_edit_json("ad/miniqwen_llmtime.json", lambda c: c.update(decimals=-1)), R),
        ("card encoding bogus", s_edit_json("ad/miniqwen_llmtime.json", lambda c: c.update(encoding="roman")), R),
        ("card format other", s_edit_json("ad/miniqwen_llmtime.json", lambda c: c.update(format="other", version=99)),
         R),
        ("card head_bias names a missing file", s_edit_json("ad/miniqwen_llmtime.json",
                                                            lambda c: c.update(head_bias="bias.safetensors")), R),
        ("adapter of another model (hidden 64)", s_adapter_tensor("hidden64"), R),
    ]
    for name, dmg, exp in damages:
        if name == "config lora_alpha NaN":
            dmg = s_py(lambda ctx: (ctx.W / "ad/adapter_config.json").write_text(
                (ctx.W / "ad/adapter_config.json").read_text().replace('"lora_alpha": 2', '"lora_alpha": NaN')))
        C(st, "damaged-adapter", f"--adapter damaged: {name}", argv_of(st, extra=["--adapter", A]), exp,
          ("--adapter", "ad", "adapter", "miniqwen_llmtime", "safetensors", "llmtime"),
          setup=s_chain(s_copy_adapter(), dmg), check=ck_forecast(3))
    C(st, "damaged-adapter", "--adapter the training/adapter dir (miniqwen format, no card)",
      argv_of(st, extra=["--adapter", "{W}/lora/training/adapter"]), E, ("--adapter", "adapter"),
      setup=s_copy("run:lora", "lora"), check=ck_forecast(3))
    C(st, "damaged-adapter", "--adapter the whole lora_default run dir",
      argv_of(st, extra=["--adapter", "{W}/lora"]), E, ("--adapter", "lora", "peft_adapter"),
      setup=s_copy("run:lora", "lora"), check=ck_forecast(3))
    # run directory
    C(st, "run-dir", "--out holds the user's README.md + training/notes.txt", argv_of(st), R, ("--out", "out"),
      setup=s_files(USER_DIR))
    C(st, "run-dir", "--out holds the user's files, --overwrite", argv_of(st, extra=["--overwrite"]), R,
      ("--out", "out"), setup=s_files(USER_DIR))
    C(st, "run-dir", "--out holds a user's results.json {stage: x}, --overwrite", argv_of(st, extra=["--overwrite"]),
      R, ("--out", "out"), setup=s_json("out/results.json", {"stage": "x"}))
    C(st, "run-dir", "--out holds a user's forecast.csv, --overwrite", argv_of(st, extra=["--overwrite"]), R,
      ("--out", "out", "forecast.csv"), setup=s_files({"out/forecast.csv": "my,own\n1,2\n"}))
    C(st, "run-dir", "--out holds a finished forecast, --overwrite", argv_of(st, extra=["--overwrite"]), OK,
      setup=s_copy("run:forecast", "out"), mutable=("out",), check=ck_forecast(3))
    C(st, "run-dir", "--out holds a finished forecast, no --overwrite", argv_of(st), R, ("--out", "--overwrite"),
      setup=s_copy("run:forecast", "out"))
    C(st, "run-dir", "--out holds a lora_default run, --overwrite", argv_of(st, extra=["--overwrite"]), E,
      ("--out", "lora_default"), setup=s_copy("run:lora", "out"), mutable=("out",), check=ck_forecast(3))


def s_rm(rel):
    def run(ctx):
        (ctx.W / rel).unlink()
    return run


def s_copy_adapter():
    def run(ctx):
        src = ctx.fx.path("run:lora") / "peft_adapter"
        shutil.copytree(src, ctx.W / "ad")
    return run


def s_adapter_tensor(how):
    code = f"""
import torch
from safetensors.torch import load_file, save_file
p = 'ad/adapter_model.safetensors'
t = load_file(p)
k = sorted(t)[0]
how = {how!r}
if how == 'nan':
    kb = [x for x in sorted(t) if 'lora_B' in x][0]
    t[kb] = torch.full_like(t[kb], float('nan'))
elif how == 'shape':
    ka = [x for x in sorted(t) if 'lora_A' in x][0]
    t[ka] = torch.zeros(t[ka].shape[0], t[ka].shape[1] + 3)
elif how == 'drop':
    del t[k]
elif how == 'extra':
    t['base_model.model.model.layers.0.mlp.gate_proj.lora_A.weight'] = torch.zeros(2, 32)
elif how == 'hidden64':
    t = {{x: torch.zeros(v.shape[0], 64) if 'lora_A' in x else torch.zeros(v.shape[0] * 2, v.shape[1])
         for x, v in t.items()}}
save_file(t, p, metadata={{'format': 'pt'}})
"""
    return s_repo_py(code)


def flops_cases():
    st = "flops"
    C(st, "legal", "plain (tiny model config)", argv_of(st), OK, check=ck_and(ck_generic, ck_no_charge))
    C(st, "legal", "no --model (Qwen2.5-0.5B sizes)", argv_of(st, drop=("--model",)), OK,
      check=ck_and(ck_generic, ck_no_charge))
    C(st, "bad-path", "--model missing", argv_of(st, set_=[("--model", "{W}/nope")]), R, ("--model", "nope"))
    C(st, "bad-path", "--model a file", argv_of(st, set_=[("--model", "{W}/m.txt")]), R, ("--model", "m.txt"),
      setup=s_files({"m.txt": "x\n"}))
    C(st, "bad-path", "--model a FIFO", argv_of(st, set_=[("--model", "{W}/mf")]), R, ("--model", "mf"),
      setup=s_fifo("mf"))
    for kind in ["config_garbage", "config_empty", "config_list", "no_config", "config_zero_layers",
                 "config_negative_heads", "config_heads_not_dividing", "config_huge_positions", "config_nan_eps"]:
        C(st, "damaged-model", f"--model damaged ({kind})", argv_of(st, set_=[("--model", "{W}/dm")]),
          E if kind in ("config_huge_positions", "config_nan_eps") else R, ("--model", "dm", "config"),
          setup=s_copy(f"dmodel:{kind}", "dm"))
    C(st, "bad-path", "--ledger a directory", argv_of(st, set_=[("--ledger", "{W}/ld")]), R, ("--ledger", "ld"),
      setup=s_dir("ld"))
    C(st, "bad-path", "--ledger a user's text file", argv_of(st, set_=[("--ledger", "{W}/notes.txt")]), R,
      ("--ledger", "notes.txt"), setup=s_files({"notes.txt": "not a ledger\n"}))
    C(st, "bad-path", "--ledger a FIFO", argv_of(st, set_=[("--ledger", "{W}/lf")]), R, ("--ledger", "lf"),
      setup=s_fifo("lf"))
    C(st, "bad-path", "--ledger missing (a typo)", argv_of(st, set_=[("--ledger", "{W}/typo.jsonl")]), E,
      ("--ledger", "typo.jsonl"), check=ck_generic)
    C(st, "bad-path", "--ledger with a line of flops NaN", argv_of(st, set_=[("--ledger", "{W}/bad.jsonl")]), R,
      ("--ledger", "bad.jsonl", "line"),
      setup=s_files({"bad.jsonl": '{"time": "t", "stage": "s", "kind": "train", "flops": NaN}\n'}))
    C(st, "bad-path", "--out a file", argv_of(st, set_=[("--out", "{W}/o.txt")]), R, ("--out", "o.txt"),
      setup=s_files({"o.txt": "mine\n"}))
    C(st, "bad-path", "--out a /dev/null node", argv_of(st, set_=[("--out", "{W}/devnull")]), R,
      ("--out", "devnull"), setup=s_devnull("devnull"))
    C(st, "bad-choice", "abbreviated --led", argv_of(st, drop=("--ledger",), extra=["--led", "{L}"]), R, "--led")
    rundir_common(st, "flops")


def benchmark_cases():
    st = "benchmark"
    C(st, "legal", "--sections peak", argv_of(st), OK, check=ck_and(ck_generic, ck_no_charge))
    numeric(st, "--threads", [("0", R), ("-2", R), ("nan", R), ("\uff13", R)])
    numeric(st, "--sections", [("", R), ("banana", R), ("peak,peak", E), ("peak,", R)])
    numeric(st, "--repeats", [("0", R), ("-1", R), ("1e30", R), ("1e400", R)])
    numeric(st, "--peak-size", [("0", R), ("-1", R), ("1e30", R), ("100000", E)])
    numeric(st, "--bandwidth-mib", [("0", R), ("1e30", R), ("nan", R), ("100000000", E)])
    numeric(st, "--counting-lengths", [("0", R), ("-4", R), ("1,,2", R)],
            extra_set=[("--sections", "counting")])
    numeric(st, "--throughput-batches", [("0", R), ("", R)], extra_set=[("--sections", "throughput")])
    numeric(st, "--loss-context", [("1", R), ("100000", R)], extra_set=[("--sections", "loss")])
    C(st, "bad-choice", "--device banana", argv_of(st, set_=[("--device", "banana")]), R, "--device")
    C(st, "bad-choice", "abbreviated --thread", argv_of(st, extra=["--thread", "2"]), R, "--thread")
    C(st, "bad-path", "--model missing with --sections forward",
      argv_of(st, set_=[("--model", "{W}/nope"), ("--sections", "forward")]), R, ("--model", "nope"))
    C(st, "bad-path", "--data missing with --sections forecast",
      argv_of(st, set_=[("--data", "{W}/nope.h5"), ("--sections", "forecast")]), R, ("--data", "nope.h5"))
    C(st, "bad-path", "--out a file", argv_of(st, set_=[("--out", "{W}/o.txt")]), R, ("--out", "o.txt"),
      setup=s_files({"o.txt": "mine\n"}))
    C(st, "run-dir", "--out holds the user's files", argv_of(st), R, ("--out", "out"), setup=s_files(USER_DIR))
    C(st, "run-dir", "--out holds the user's files, --overwrite", argv_of(st, extra=["--overwrite"]), R,
      ("--out", "out"), setup=s_files(USER_DIR))
    C(st, "run-dir", "--out holds the user's benchmark.md, --overwrite", argv_of(st, extra=["--overwrite"]), R,
      ("--out", "out", "benchmark.md"), setup=s_files({"out/benchmark.md": "# my table\n"}))
    C(st, "damaged-model", "--model config garbage, --sections forward",
      argv_of(st, set_=[("--model", "{W}/dm"), ("--sections", "forward")]), R, ("--model", "dm", "config"),
      setup=s_copy("dmodel:config_garbage", "dm"))


def train_cases():
    st = "train"
    C(st, "legal", "plain tiny train", argv_of(st), OK)
    C(st, "legal", "--no-ledger", argv_of(st, extra=["--no-ledger"]), OK, check=ck_no_charge)
    numeric(st, "--lr", [("nan", R), ("-1", R), ("", R), ("\u0661e-4", R)])
    numeric(st, "--rank", [("0", R), ("1e30", R)])
    numeric(st, "--batch-size", [("100", R), ("0", R)])
    numeric(st, "--max-steps", [("0", R), ("1e400", R)])
    numeric(st, "--context-length", [("32", R)], names=("--context-length", "chunks"))
    numeric(st, "--kill-after-step", [("-1", E)])
    numeric(st, "--stage", [("", E)])
    C(st, "bad-choice", "--loss-vocabulary numeric", argv_of(st, extra=["--loss-vocabulary", "numeric"]), R,
      "--loss-vocabulary")
    C(st, "bad-choice", "no --out", argv_of(st, drop=("--out",)), R, "--out")
    for name, val, setup in [("missing", "{W}/nope.st", None), ("a directory", "{W}/dd", s_dir("dd")),
                             ("a FIFO", "{W}/f.st", s_fifo("f.st")), ("/dev/null", "/dev/null", None),
                             ("garbage", "{W}/g.st", s_files({"g.st": "garbage"})),
                             ("truncated", "{W}/t.st", s_chain(s_copy("chunks", "t.st"),
                                                               lambda ctx: _truncate(ctx.W / "t.st"))),
                             ("chmod 000", "{W}/locked.st", s_unreadable("locked.st")),
                             ("token ids outside the vocabulary", "{W}/oov.st", s_repo_py(
                                 "import torch\nfrom safetensors.torch import save_file\n"
                                 "save_file({'input_ids': torch.full((6, 16), 200000), "
                                 "'attention_mask': torch.ones(6, 16, dtype=torch.long)}, 'oov.st')")),
                             ("float token ids", "{W}/fl.st", s_repo_py(
                                 "import torch\nfrom safetensors.torch import save_file\n"
                                 "save_file({'input_ids': torch.ones(6, 16), "
                                 "'attention_mask': torch.ones(6, 16, dtype=torch.long)}, 'fl.st')")),
                             ("all-zero mask", "{W}/zm.st", s_repo_py(
                                 "import torch\nfrom safetensors.torch import save_file\n"
                                 "save_file({'input_ids': torch.ones(6, 16, dtype=torch.long), "
                                 "'attention_mask': torch.zeros(6, 16, dtype=torch.long)}, 'zm.st')"))]:
        C(st, "bad-path", f"--train-chunks {name}", argv_of(st, set_=[("--train-chunks", val)]), R,
          ("--train-chunks", Path(val).name, "chunk", "--context-length"), setup=setup)
    C(st, "bad-path", "--val-chunks garbage", argv_of(st, extra=["--val-chunks", "{W}/g.st"]), R,
      ("--val-chunks", "g.st"), setup=s_files({"g.st": "garbage"}))
    C(st, "bad-path", "--model missing", argv_of(st, set_=[("--model", "{W}/nope")]), R, ("--model", "nope"))
    C(st, "damaged-model", "--model damaged (nan_tensor)", argv_of(st, set_=[("--model", "{W}/dm")]), R,
      ("--model", "dm", "NaN", "non-finite"), setup=s_copy("dmodel:nan_tensor", "dm"))
    C(st, "damaged-model", "--model damaged (wrong_shape)", argv_of(st, set_=[("--model", "{W}/dm")]), R,
      ("--model", "dm", "shape"), setup=s_copy("dmodel:wrong_shape", "dm"))
    C(st, "bad-path", "--ledger a directory", argv_of(st, set_=[("--ledger", "{W}/ld")]), R, ("--ledger", "ld"),
      setup=s_dir("ld"))
    C(st, "bad-path", "--ledger a user's text file", argv_of(st, set_=[("--ledger", "{W}/notes.txt")]), R,
      ("--ledger", "notes.txt"), setup=s_files({"notes.txt": "not a ledger\n"}))
    C(st, "resume", "--resume into an empty --out", argv_of(st, extra=["--resume"]), R, ("--resume", "nothing"))
    C(st, "resume", "--resume into a user's dir", argv_of(st, extra=["--resume"]), R, ("--resume", "out"),
      setup=s_files(USER_DIR))
    C(st, "resume", "--resume a lora_default run", argv_of(st, extra=["--resume"]), R, ("lora_default", "--resume"),
      setup=s_copy("run:lora", "out"))
    for opt, val in [("--lr", "0.5"), ("--rank", "4"), ("--seed", "3")]:
        C(st, "resume", f"--resume a finished train run with {opt} {val}",
          argv_of(st, set_=[(opt, val), ("--max-steps", "4")], extra=["--resume"]), R,
          (opt, "--resume", "differ", "settings", "checkpoint"), setup=s_copy("run:train", "out"))
    C(st, "resume", "--resume a finished train run, same settings, --max-steps 4",
      argv_of(st, set_=[("--max-steps", "4")], extra=["--resume"]), OK, setup=s_copy("run:train", "out"),
      mutable=("out",), check=ck_and(ck_generic, ck_steps(4)))
    C(st, "run-dir", "--out holds the user's files", argv_of(st), R, ("--out", "out"), setup=s_files(USER_DIR))
    C(st, "run-dir", "--out holds the user's files, --overwrite", argv_of(st, extra=["--overwrite"]), R,
      ("--out", "out"), setup=s_files(USER_DIR))
    C(st, "run-dir", "--out holds a finished train run, --overwrite", argv_of(st, extra=["--overwrite"]), OK,
      setup=s_copy("run:train", "out"), mutable=("out",))


def s_report_results():
    """{W}/res: a finished baseline run and its ledger, as a user's results tree."""
    def run(ctx):
        shutil.copytree(ctx.fx.path("run:baseline"), ctx.W / "res" / "baseline")
        (ctx.W / "res" / "flops_ledger.jsonl").write_text(json.dumps(EARLIER) + "\n")
    return run


def report_cases():
    st = "report"
    res = s_report_results()
    C(st, "legal", "a results tree with one baseline run", argv_of(st), OK, setup=res)
    C(st, "run-dir", "--out R.md is the user's file", argv_of(st), R, ("--out", "R.md"),
      setup=s_chain(res, s_files({"R.md": "# my report, by hand\n"})))
    C(st, "run-dir", "--out R.md is the user's file, --overwrite", argv_of(st, extra=["--overwrite"]), R,
      ("--out", "R.md"), setup=s_chain(res, s_files({"R.md": "# my report, by hand\n"})))
    C(st, "run-dir", "--out R.md is an empty user file, --overwrite", argv_of(st, extra=["--overwrite"]), R,
      ("--out", "R.md"), setup=s_chain(res, s_files({"R.md": ""})))
    C(st, "run-dir", "--out a report this command wrote, --overwrite", argv_of(st, extra=["--overwrite"]), OK,
      setup=s_chain(res, s_report_prewritten()), mutable=("R.md", "res/report"), check=ck_generic)
    C(st, "run-dir", "--out a directory", argv_of(st, set_=[("--out", "{W}/rd")]), R, ("--out", "rd"),
      setup=s_chain(res, s_dir("rd")))
    C(st, "run-dir", "--out a /dev/null node", argv_of(st, set_=[("--out", "{W}/devnull")]), R,
      ("--out", "devnull"), setup=s_chain(res, s_devnull("devnull")))
    C(st, "run-dir", "--out a FIFO", argv_of(st, set_=[("--out", "{W}/rf")]), R, ("--out", "rf"),
      setup=s_chain(res, s_fifo("rf")))
    C(st, "run-dir", "--out in a missing directory", argv_of(st, set_=[("--out", "{W}/newdir/R.md")]), E,
      ("--out", "newdir"), setup=res, check=ck_generic)
    C(st, "run-dir", "--results holds the user's report/ figures (same names the report writes)", argv_of(st), E,
      ("report", "--results"), setup=s_chain(res, s_files({"res/report/horizon_mae_validation_2.png": b"my png",
                                                           "res/report/notes.txt": "mine\n"})))
    C(st, "bad-path", "--results missing", argv_of(st, set_=[("--results", "{W}/nope")], drop=("--ledger",)), R,
      ("--results", "nope"))
    C(st, "bad-path", "--results a file", argv_of(st, set_=[("--results", "{W}/f.txt")], drop=("--ledger",)), R,
      ("--results", "f.txt"), setup=s_files({"f.txt": "x\n"}))
    C(st, "bad-path", "--results an empty dir", argv_of(st, set_=[("--results", "{W}/er")], drop=("--ledger",)), E,
      ("--results", "er", "results.json"), setup=s_dir("er"), check=ck_generic)
    C(st, "bad-path", "--ledger missing", argv_of(st, set_=[("--ledger", "{W}/typo.jsonl")]), R,
      ("--ledger", "typo.jsonl"), setup=res)
    C(st, "bad-path", "--ledger a user's text file", argv_of(st, set_=[("--ledger", "{W}/notes.txt")]), R,
      ("--ledger", "notes.txt"), setup=s_chain(res, s_files({"notes.txt": "shopping\n"})))
    C(st, "bad-path", "--ledger a directory", argv_of(st, set_=[("--ledger", "{W}/ld")]), R, ("--ledger", "ld"),
      setup=s_chain(res, s_dir("ld")))
    C(st, "bad-path", "--ledger a FIFO", argv_of(st, set_=[("--ledger", "{W}/lf")]), R, ("--ledger", "lf"),
      setup=s_chain(res, s_fifo("lf")))
    C(st, "damaged-run", "a results.json of garbage in the tree", argv_of(st), E, ("results.json", "garbage"),
      setup=s_chain(res, s_files({"res/broken/results.json": "{garbage"})), check=ck_generic)
    C(st, "damaged-run", "a results.json {stage: x} in the tree", argv_of(st), E, ("results.json", "stage"),
      setup=s_chain(res, s_json("res/odd/results.json", {"stage": "x"})), check=ck_generic)
    C(st, "damaged-run", "a results.json with flops NaN", argv_of(st), E, ("results.json", "flops"),
      setup=s_chain(res, s_edit_json("res/baseline/results.json", lambda r: r.update(flops=float("nan")))),
      check=ck_generic)
    C(st, "damaged-run", "a results.json that is a FIFO", argv_of(st), E, ("results.json",),
      setup=s_chain(res, s_dir("res/x"), s_fifo("res/x/results.json")), check=ck_generic)
    C(st, "bad-choice", "abbreviated --led", argv_of(st, drop=("--ledger",), extra=["--led", "{W}/l.jsonl"]), R,
      "--led", setup=res)


def s_report_prewritten():
    def run(ctx):
        env = clean_env(ctx.envdir, ctx.L, ctx.M, ctx.D)
        p = subprocess.run([str(ctx.fx.py), "-m", "experiments.report", "--results", str(ctx.W / "res"),
                            "--ledger", str(ctx.W / "res" / "flops_ledger.jsonl"), "--out", str(ctx.W / "R.md")],
                           cwd=ctx.repo, env=env, capture_output=True, text=True, timeout=300)
        if p.returncode != 0:
            raise FixtureError(f"pre-writing the report failed: {p.stderr.strip().splitlines()[-1:]}")
    return run


def concurrent_cases():
    pairs = [("baseline", "classical"), ("baseline", "baseline"), ("lora_default", "sweep"), ("flops", "benchmark"),
             ("lora_default", "train"), ("search", "final")]
    for a, b in pairs:
        C(a, "concurrent", f"{a} and {b} started into the same --out at once", [], "one",
          concurrent=[(a, argv_of(a)), (b, argv_of(b))])
    C("forecast", "concurrent", "forecast and forecast into the same --out at once", [], "one",
      concurrent=[("forecast", argv_of("forecast")), ("forecast", argv_of("forecast", extra=["--method", "var"]))])


# ==================================================================================================== running

@dataclass
class Ctx:
    repo: Path
    W: Path
    envdir: Path
    fx: Fixtures
    M: Path
    D: Path
    L: Path
    sub: dict = field(default_factory=dict)


def snapshot(root: Path) -> dict:
    """{relative path: sha256 | 'dir' | 'fifo' | 'chr' | '-> target' | 'unreadable'} of everything under root,
    never opening anything but regular files."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            try:
                st = os.lstat(p)
            except OSError:
                continue
            if stat.S_ISLNK(st.st_mode):
                out[rel] = "-> " + os.readlink(p)
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = "dir"
            elif stat.S_ISREG(st.st_mode):
                try:
                    h = hashlib.sha256()
                    with open(p, "rb") as f:
                        for block in iter(lambda: f.read(1 << 20), b""):
                            h.update(block)
                    out[rel] = h.hexdigest()
                except OSError:
                    out[rel] = "unreadable"
            elif stat.S_ISFIFO(st.st_mode):
                out[rel] = "fifo"
            elif stat.S_ISCHR(st.st_mode):
                out[rel] = "chr"
            else:
                out[rel] = "other"
    return out


def ledger_lines(p: Path) -> list[str] | None:
    try:
        if not p.is_file():
            return None
        return [l for l in p.read_text(errors="replace").splitlines() if l.strip()]
    except OSError:
        return None


def shell_line(repo: Path, stage: str, args: list[str], sub: dict) -> str:
    """The command line a user would type (env assignments before a lone '!' marker are put in front)."""
    env_words = []
    if "!" in args:
        i = args.index("!")
        env_words, args = args[:i], args[i + 1:]
    py = repo / ".venv" / "bin" / "python"
    words = [shlex.quote(fill(w, sub)) for w in env_words]
    words += [shlex.quote(str(py)), "-m", f"experiments.{stage}"] + [shlex.quote(fill(a, sub)) for a in args]
    return " ".join(words)


def run_shell(cmd: str, repo: Path, env: dict, timeout: float):
    start = time.monotonic()
    p = subprocess.Popen(["bash", "-c", cmd], cwd=repo, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
        timed_out = False
    except subprocess.TimeoutExpired:
        try:
            os.killpg(p.pid, signal.SIGKILL)  # only the group this harness started
        except ProcessLookupError:
            pass
        out, err = p.communicate()
        timed_out = True
    return {"exit": p.returncode, "stdout": out.decode(errors="replace"), "stderr": err.decode(errors="replace"),
            "wall": round(time.monotonic() - start, 2), "timed_out": timed_out}


def names_ok(line: str, names: tuple) -> bool:
    if not names:
        return True
    low = line.lower()
    return any(n.lower() in low for n in names)


def run_case(case: Case, opts, fx: Fixtures) -> dict:
    repo = opts.repo
    croot = opts.work / "cases" / f"{case.cid:03d}"
    shutil.rmtree(croot, ignore_errors=True)
    W, envdir = croot / "w", croot / "env"
    W.mkdir(parents=True)
    rec = {"id": case.cid, "stage": case.stage, "category": case.category, "name": case.name,
           "expect": case.expect, "dir": str(W)}
    try:
        M, D0 = fx.path("model"), fx.path("data")
        shutil.copy2(D0, W / "lv.h5")
        L = W / "ledger.jsonl"
        L.write_text(json.dumps(EARLIER) + "\n")
        ctx = Ctx(repo, W, envdir, fx, M, W / "lv.h5", L)
        ctx.sub = {"{W}": str(W), "{M}": str(M), "{D}": str(W / "lv.h5"), "{L}": str(L), "{O}": str(W / "out")}
        if case.stage == "train" or any("{C}" in a for a in case.args) or case.concurrent:
            shutil.copy2(fx.path("chunks"), W / "chunks.safetensors")
        ctx.sub["{C}"] = str(W / "chunks.safetensors")
        if case.setup:
            case.setup(ctx)
    except Skip as err:
        rec.update({"class": "skipped", "note": str(err), "cmd": ""})
        return finish(rec, croot, opts)
    except (FixtureError, OSError, subprocess.SubprocessError, ValueError, KeyError) as err:
        rec.update({"class": "fixture-error", "note": f"{type(err).__name__}: {err}", "cmd": ""})
        return finish(rec, croot, opts)

    before = snapshot(W)
    led_before = ledger_lines(L)
    env = clean_env(envdir, L, M, W / "lv.h5")
    if case.concurrent:
        return run_concurrent(case, ctx, env, before, led_before, rec, croot, opts)
    cmd = shell_line(repo, case.stage, case.args, ctx.sub)
    rec["cmd"] = cmd
    r = run_shell(cmd, repo, env, opts.timeout)
    after = snapshot(W)
    rec.update(measure(r, before, after, led_before, ledger_lines(L), case))
    rec["class"], rec["note"] = classify(case, rec, ctx)
    return finish(rec, croot, opts)


def measure(r, before, after, led_before, led_after, case):
    lines = [l for l in r["stderr"].splitlines() if l.strip()]
    changed, vanished = [], []
    for rel, h in before.items():
        if rel == "ledger.jsonl":
            continue
        if any(rel == m or rel.startswith(m.rstrip("/") + "/") for m in case.mutable):
            continue
        if rel not in after:
            vanished.append(rel)
        elif after[rel] != h and h != "dir":
            changed.append(rel)
    new = sorted(rel for rel in after if rel not in before and not rel.endswith(".lock"))
    gained = 0
    ledger_damaged = False
    if led_before is not None:
        if led_after is None:
            ledger_damaged = True
        else:
            if led_after[:len(led_before)] != led_before:
                ledger_damaged = True
            gained = max(0, len(led_after) - len(led_before))
    return {"exit": r["exit"], "wall": r["wall"], "timed_out": r["timed_out"],
            "stderr_lines": len(r["stderr"].splitlines()), "stderr_nonempty": len(lines),
            "traceback": "Traceback" in r["stderr"], "stderr_head": lines[:3], "stderr_tail": lines[-3:],
            "stdout_tail": [l for l in r["stdout"].splitlines() if l.strip()][-2:],
            "changed": changed, "vanished": vanished, "new": new[:20], "new_count": len(new),
            "ledger_gained": gained, "ledger_damaged": ledger_damaged}


def classify(case, rec, ctx):
    if rec["timed_out"]:
        return "hang", f"still running after {rec['wall']} s"
    if rec["traceback"]:
        return "traceback", (rec["stderr_tail"] or [""])[-1][:300]
    if rec["changed"] or rec["vanished"] or rec["ledger_damaged"]:
        return "loss", (f"changed {rec['changed'][:5]} vanished {rec['vanished'][:5]}"
                        + (" ledger's earlier lines altered" if rec["ledger_damaged"] else ""))
    code = rec["exit"]
    if code == 0:
        if case.expect == "refuse":
            return "silent", "exit 0 on an input that should be refused" + (
                f"; charged {rec['ledger_gained']} line(s)" if rec["ledger_gained"] else "")
        check = case.check or ck_generic
        try:
            ok, note = check(ctx, case, rec)
        except Exception as err:  # a check that cannot read what it needs: the result is not right
            ok, note = False, f"check failed: {type(err).__name__}: {err}"
        return ("ok", "") if ok else ("silent", f"exit 0 but wrong result: {note}")
    if code == 2:
        n = rec["stderr_nonempty"]
        if n != 1:
            return "multi-line", f"{n} non-empty stderr lines"
        line = rec["stderr_tail"][-1]
        if rec["ledger_gained"] or rec["new_count"]:
            return "late", f"refused after charging {rec['ledger_gained']} line(s) / writing {rec['new'][:5]}"
        if not names_ok(line, case.names):
            return "vague", f"the line names none of {list(case.names)}"
        if case.expect == "ok":
            return "over-refused", "a legal input was refused"
        return "refused", ""
    return "bad-exit", f"exit {code}; " + " | ".join(rec["stderr_tail"])[:300]


def run_concurrent(case, ctx, env, before, led_before, rec, croot, opts):
    cmds = [shell_line(opts.repo, s, a, ctx.sub) for s, a in case.concurrent]
    rec["cmd"] = "  &  ".join(cmds)
    results = [None] * len(cmds)

    def go(i):
        results[i] = run_shell(cmds[i], opts.repo, env, opts.timeout)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(cmds))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = snapshot(ctx.W)
    led_after = ledger_lines(ctx.L)
    per = [measure(r, before, after, led_before, led_after, case) for r in results]
    rec.update({"exit": [p["exit"] for p in per], "wall": max(p["wall"] for p in per),
                "timed_out": any(p["timed_out"] for p in per),
                "stderr_lines": [p["stderr_lines"] for p in per], "stderr_nonempty": [p["stderr_nonempty"] for p in per],
                "traceback": any(p["traceback"] for p in per), "stderr_tail": [p["stderr_tail"] for p in per],
                "changed": per[0]["changed"], "vanished": per[0]["vanished"], "new": per[0]["new"],
                "new_count": per[0]["new_count"], "ledger_gained": per[0]["ledger_gained"],
                "ledger_damaged": per[0]["ledger_damaged"]})
    if rec["timed_out"]:
        cls, note = "hang", "one of them still running at the timeout"
    elif rec["traceback"]:
        cls, note = "traceback", str([t[-1:] for t in rec["stderr_tail"]])[:300]
    elif rec["changed"] or rec["vanished"] or rec["ledger_damaged"]:
        cls, note = "loss", f"changed {rec['changed'][:5]} vanished {rec['vanished'][:5]}"
    else:
        exits = rec["exit"]
        winners = [i for i, c in enumerate(exits) if c == 0]
        losers = [i for i, c in enumerate(exits) if c != 0]
        if len(winners) == len(exits):
            cls, note = "silent", "both ran to exit 0 in the same --out"
        elif len(winners) == 0:
            cls, note = "bad-exit", f"neither finished: exits {exits}"
        else:
            bad = [i for i in losers if exits[i] != 2 or per[i]["stderr_nonempty"] != 1]
            rec_ = _json(ctx.W / "out" / "run.json")
            win_stage = case.concurrent[winners[0]][0]
            if bad:
                i = bad[0]
                cls = "multi-line" if exits[i] == 2 else "bad-exit"
                note = f"the refused one: exit {exits[i]}, {per[i]['stderr_nonempty']} stderr lines"
            elif not (isinstance(rec_, dict) and rec_.get("stage") == win_stage):
                cls, note = "silent", f"--out run record says {rec_ and rec_.get('stage')}, the winner was {win_stage}"
            elif not names_ok(per[losers[0]]["stderr_tail"][-1],
                              ("--out", "another stage", "already holds", "running")):
                cls, note = "vague", "the refusal does not name --out"
            else:
                cls, note = "refused", f"one ran (exit 0), the other was refused: {per[losers[0]]['stderr_tail'][-1]}"
    rec["class"], rec["note"] = cls, note
    return finish(rec, croot, opts)


def finish(rec, croot, opts):
    good = rec.get("class") in ("refused", "ok", "skipped")
    if good and not opts.keep:
        _rmtree(croot)
    return rec


def _rmtree(p: Path):
    def onerror(func, path, exc):
        try:
            os.chmod(path, 0o700)
            func(path)
        except OSError:
            pass
    for dirpath, dirnames, _ in os.walk(p):
        for d in dirnames:
            try:
                os.chmod(os.path.join(dirpath, d), 0o700)
            except OSError:
                pass
    shutil.rmtree(p, onerror=onerror)


# ==================================================================================================== summary

def order_cases() -> list[Case]:
    """Round-robin over stages so that the first N cases of a smoke run touch every stage."""
    def by_category(cases):  # within a stage, round-robin over its categories too
        cats = {}
        for c in cases:
            cats.setdefault(c.category, []).append(c)
        out = []
        while any(cats.values()):
            for k in list(cats):
                if cats[k]:
                    out.append(cats[k].pop(0))
        return out

    by_stage = {s: by_category([c for c in CASES if c.stage == s]) for s in STAGES}
    out = []
    while any(by_stage.values()):
        for s in STAGES:
            if by_stage[s]:
                out.append(by_stage[s].pop(0))
    for i, c in enumerate(out, 1):
        c.cid = i
    return out


def write_summary(path: Path, records: list[dict], opts, started: float):
    classes = ["refused", "ok", *FAILURES, "fixture-error", "skipped"]
    lines = [f"# Issue 35 re-trial: {len(records)} cases against `{opts.repo}`", "",
             f"Run {time.strftime('%Y-%m-%d %H:%M:%S')}, {round(time.time() - started)} s, timeout {opts.timeout} s, "
             f"jobs {opts.jobs}. Results: `{opts.results}`.", ""]
    count = {c: sum(1 for r in records if r.get("class") == c) for c in classes}
    lines += ["## Counts per class", "", "| class | cases |", "| --- | ---: |"]
    lines += [f"| {c} | {n} |" for c, n in count.items() if n]
    used = [c for c in classes if count[c]]
    for key, title in (("stage", "stage"), ("category", "category")):
        vals = sorted({r[key] for r in records}, key=lambda v: (STAGES.index(v) if v in STAGES else 99, v))
        lines += ["", f"## Per {title}", "", f"| {title} | total | " + " | ".join(used) + " |",
                  "| --- | ---: | " + " | ".join("---:" for _ in used) + " |"]
        for v in vals:
            rs = [r for r in records if r[key] == v]
            lines.append(f"| {v} | {len(rs)} | " + " | ".join(str(sum(1 for r in rs if r.get('class') == c) or '')
                                                             for c in used) + " |")
    bad = [r for r in records if r.get("class") not in ("refused", "ok", "skipped")]
    lines += ["", f"## Cases neither refused nor ok ({len(bad)})", ""]
    for r in sorted(bad, key=lambda r: (classes.index(r.get("class", "bad-exit")), r["id"])):
        lines.append(f"### #{r['id']} [{r.get('class')}] {r['stage']}: {r['name']} (expected {r['expect']})")
        lines.append("")
        lines.append("```")
        lines.append(r.get("cmd", ""))
        lines.append("```")
        lines.append(f"- what happened: exit {r.get('exit')}, {r.get('wall')} s, stderr "
                     f"{r.get('stderr_nonempty')} non-empty line(s), ledger +{r.get('ledger_gained')}, "
                     f"new files {r.get('new_count')}; {r.get('note', '')}")
        tail = r.get("stderr_tail")
        if tail:
            lines.append("- stderr (last lines): " + json.dumps(tail, ensure_ascii=False)[:800])
        if r.get("dir"):
            lines.append(f"- case dir kept: `{r['dir']}`")
        lines.append("")
    skipped = [r for r in records if r.get("class") == "skipped"]
    if skipped:
        lines += [f"## Skipped ({len(skipped)})", ""]
        lines += [f"- #{r['id']} {r['stage']}: {r['name']}: {r.get('note')}" for r in skipped]
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repo", type=Path, required=True, help="repository root whose .venv and code are run")
    ap.add_argument("--only", type=int, default=None, help="run only the first N cases (smoke)")
    ap.add_argument("--jobs", type=int, default=1, help="cases run at once (default 1)")
    ap.add_argument("--filter", default=None, help="only cases whose stage/category/name contains this text")
    ap.add_argument("--ids", default=None, help="only these case ids (comma-separated)")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per command before it is a hang")
    ap.add_argument("--work", type=Path, default=Path("/tmp/trial/work"), help="case directories and fixtures")
    ap.add_argument("--results", type=Path, default=Path("/tmp/trial/results.jsonl"))
    ap.add_argument("--summary", type=Path, default=Path("/tmp/trial/summary.md"))
    ap.add_argument("--extended", action="store_true", help="also the extended cases (more values per option, "
                    "more damage kinds)")
    ap.add_argument("--keep", action="store_true", help="keep the directories of refused/ok cases too")
    ap.add_argument("--list", action="store_true", help="print the cases and their counts, run nothing")
    opts = ap.parse_args(argv)
    opts.repo = opts.repo.resolve()
    if opts.jobs < 1:
        ap.error("--jobs must be >= 1")
    catalogue()
    cases = [c for c in order_cases() if opts.extended or c.tier == 1]
    if opts.filter:
        cases = [c for c in cases if opts.filter.lower() in f"{c.stage} {c.category} {c.name}".lower()]
    if opts.ids:
        want = {int(x) for x in opts.ids.split(",") if x.strip()}
        cases = [c for c in cases if c.cid in want]
    if opts.only is not None:
        cases = cases[:opts.only]
    if opts.list:
        for c in cases:
            print(f"{c.cid:3d} {c.stage:15s} {c.category:16s} {c.expect:7s} {c.name}")
        print_counts(cases)
        return 0
    py = opts.repo / ".venv" / "bin" / "python"
    if not py.is_file():
        ap.error(f"{py} does not exist")
    started = time.time()
    opts.work.mkdir(parents=True, exist_ok=True)
    fx = Fixtures(opts.repo, opts.work / "fixtures", opts.timeout)
    records: list[dict] = []
    opts.results.parent.mkdir(parents=True, exist_ok=True)
    lock = threading.Lock()
    with opts.results.open("w") as out:
        def done(rec):
            with lock:
                records.append(rec)
                out.write(json.dumps(rec, ensure_ascii=False) + "\n")
                out.flush()
                print(f"[{len(records):3d}/{len(cases)}] #{rec['id']:3d} {rec.get('class', '?'):12s} "
                      f"{rec.get('wall', '-')!s:>6}s {rec['stage']}: {rec['name']}"
                      + (f"  -- {rec.get('note')}" if rec.get("class") not in ("ok", "refused") else ""),
                      flush=True)

        def one(c):
            try:
                return run_case(c, opts, fx)
            except Exception as err:  # the harness's own failure: recorded, never hides the others
                return {"id": c.cid, "stage": c.stage, "category": c.category, "name": c.name, "expect": c.expect,
                        "class": "fixture-error", "note": f"harness: {type(err).__name__}: {err}", "cmd": ""}

        if opts.jobs == 1:
            for c in cases:
                done(one(c))
        else:
            with concurrent.futures.ThreadPoolExecutor(opts.jobs) as pool:
                for rec in pool.map(one, cases):
                    done(rec)
    records.sort(key=lambda r: r["id"])
    write_summary(opts.summary, records, opts, started)
    print(f"wrote {opts.results} and {opts.summary}")
    return 0


def print_counts(cases):
    from collections import Counter
    print(f"\n{len(cases)} cases")
    print("by stage:", dict(Counter(c.stage for c in cases)))
    print("by category:", dict(Counter(c.category for c in cases)))
    print("by expectation:", dict(Counter(c.expect for c in cases)))


if __name__ == "__main__":
    sys.exit(main())
