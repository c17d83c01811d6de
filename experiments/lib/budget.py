"""The project's compute ledger: every FLOP spent on the model, appended as it is spent, checked against the budget.

The research question fixes a total budget of ``BUDGET = 1e17`` FLOPs (coursework rules, see
:mod:`miniqwen.flop_count`) for everything run on Qwen2.5-0.5B-Instruct: evaluation, training, searches. Each run
charges what it spent to an append-only JSON-lines file (default ``runs/flops_ledger.jsonl``, or the path in the
environment variable ``MINIQWEN_LEDGER``), one object per line::

    {"time": "2025-01-01T12:00:00+00:00", "stage": "lora_default", "kind": "train", "flops": 61000000000000000}

**Callers pass FLOPs already multiplied by the coursework convention**: a training step costs 3× its forward pass
(backward = 2× forward; :func:`miniqwen.flop_count.training_flops`), evaluation and generation 1× forward
(:func:`miniqwen.flop_count.forward_flops` / :func:`miniqwen.flop_count.generation_flops`, or a
:class:`miniqwen.flop_count.FlopCounter` total). The ledger does not multiply anything.

Before a run, :meth:`Ledger.check` compares ledger + planned against the budget and refuses (unless forced).

Crash safety: an append rewrites the whole file to a temporary file in the same directory, fsyncs it and moves
it over the ledger with ``os.replace`` (atomic on POSIX), so a crash leaves either the old or the new ledger, never
half a line. A torn or invalid line found when reading (e.g. written by hand or by another tool) is an error
(:class:`LedgerError`, naming file and line), never silently dropped: spent compute must not disappear.

Symbolic links: a ledger path that is a link (or lies under one) is resolved before writing: the temporary file, the
replace and the lock (``<target>.lock``) all sit beside the link's target, so the link stays a link and every
charge lands in the one file it points to (replacing the link itself would fork the ledger).
"""

from __future__ import annotations

import json
import math
import numbers
import os
import sys
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from data.series import not_a_regular_file
from miniqwen.atomic import atomic_write

try:
    import fcntl
except ImportError:  # not POSIX: no cross-process lock, the atomic replace still protects each write
    fcntl = None

BUDGET = 10**17
"""Total compute budget of the project in FLOPs (coursework rules)."""

KINDS = ("train", "eval", "generate")
DEFAULT_PATH = "runs/flops_ledger.jsonl"
ENV_VAR = "MINIQWEN_LEDGER"
_RESERVED = ("time", "stage", "kind", "flops")


class LedgerError(RuntimeError):
    """The ledger file is unreadable, or an entry is torn/invalid (the message names the file and line)."""


class BudgetExceededError(RuntimeError):
    """A planned run would take the ledger over the budget (pass ``force=True`` / ``--force`` to run anyway)."""


def sci(x: int | float) -> str:
    """FLOPs in scientific notation with 3 significant figures, e.g. ``6.12e+16``."""
    return f"{x:.3g}" if x == 0 else f"{x:.2e}"


def _sci_apart(*values: int) -> list[str]:
    """``values`` as :func:`sci` writes them, with as many more significant figures as it takes (up to 7) for
    values that differ to read differently, else as exact integers ("100,000,000,000,000,001"): a message must
    not say "from 1.00e+17 to 1.00e+17"."""
    def apart(texts):
        return all(texts[i] != texts[j] for i in range(len(values)) for j in range(i)
                   if values[i] != values[j])

    for digits in range(2, 7):
        texts = [f"{v:.3g}" if v == 0 else f"{v:.{digits}e}" for v in values]
        if apart(texts):
            return texts
    return [f"{v:,}" for v in values]


class Ledger:
    """Append-only FLOP ledger in a JSON-lines file.

    Args:
        path: ledger file; default ``$MINIQWEN_LEDGER`` if set, else ``runs/flops_ledger.jsonl`` relative to the
            current directory. Need not exist yet (an absent ledger is empty; the directory is made on first
            charge).
    """

    def __init__(self, path: str | os.PathLike | None = None) -> None:
        if path is None:
            path = os.environ.get(ENV_VAR) or DEFAULT_PATH
        self.path = Path(path)
        self._check_regular()

    def _check_regular(self) -> None:
        """Raise LedgerError if the ledger exists but is not a regular file (a FIFO would block every read, a
        directory cannot be one)."""
        kind = not_a_regular_file(self.path)  # None when absent (an empty ledger) or a regular file
        if kind:
            what = kind if kind == "not a regular file" else f"{kind}, not a regular file"
            raise LedgerError(f"{self._where()}: the ledger is {what}: give a ledger file "
                              f"(--ledger or ${ENV_VAR})")

    def __repr__(self) -> str:
        return f"Ledger({str(self.path)!r})"

    # ------------------------------------------------------------------ reading
    def _read_text(self) -> str:
        self._check_regular()  # again: it may have been replaced since
        try:
            return self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return ""
        except (OSError, UnicodeDecodeError) as err:
            raise LedgerError(f"{self.path}: cannot read ledger: {err}") from None

    def entries(self) -> list[dict]:
        """All entries, oldest first, each a dict with at least ``time``, ``stage``, ``kind``, ``flops`` (int).

        Raises:
            LedgerError: naming the file and 1-based line number, for a line that is not terminated by a newline
                (torn write), not a JSON object, or lacks a valid ``stage``/``kind``/``flops``.
        """
        return self._parse(self._read_text())

    def _parse(self, text: str) -> list[dict]:
        """Entries of ledger text ``text`` (see :meth:`entries`)."""
        out = []
        if not text:
            return out
        lines = text.split("\n")
        if lines[-1] != "":
            raise LedgerError(
                f"{self.path}:{len(lines)}: last line has no newline (torn write?); fix or remove it by hand "
                f"after checking what was spent: {lines[-1][:80]!r}")
        for number, line in enumerate(lines[:-1], start=1):
            if not line.strip():
                raise LedgerError(f"{self.path}:{number}: empty line in ledger")
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as err:
                raise LedgerError(f"{self.path}:{number}: not JSON ({err}): {line[:80]!r}") from None
            problem = _validate(entry)
            if problem:
                raise LedgerError(f"{self.path}:{number}: {problem}")
            out.append(entry)
        return out

    def total(self) -> int:
        """FLOPs charged so far (int). Raises :class:`LedgerError` like :meth:`entries`."""
        return sum(e["flops"] for e in self.entries())

    # ------------------------------------------------------------------ writing
    def charge(self, stage: str, flops: int, kind: str, **details) -> dict:
        """Append one entry and return it.

        Args:
            stage: coursework stage name, e.g. ``"baseline"``, ``"lora_default"``.
            flops: FLOPs spent, already multiplied (training 3× forward, eval/generate 1× forward); int >= 0
                (a float with an integral value, e.g. ``1e15``, is accepted and stored as int).
            kind: ``"train"``, ``"eval"`` or ``"generate"``.
            details: free-form JSON-serialisable fields (steps, batch size, rank, run directory …); may not use
                the names time/stage/kind/flops.

        Raises:
            ValueError: invalid stage/kind/flops (including NaN, infinite, negative or fractional FLOPs) or detail
                names, or details that are not JSON-serialisable; the message names the ledger file.
            LedgerError: the existing ledger is invalid (nothing is written then) or cannot be written.
        """
        flops = _as_int(flops)
        clash = [k for k in details if k in _RESERVED]
        if clash:
            raise ValueError(f"{self.path}: detail names {clash} clash with the ledger's own fields {_RESERVED}")
        entry = {"time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "stage": stage, "kind": kind,
                 "flops": flops, **details}
        problem = _validate(entry)
        if problem:
            raise ValueError(f"{self.path}: cannot charge: {problem}")
        try:
            line = json.dumps(entry, ensure_ascii=False, allow_nan=False)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{self.path}: ledger details must be JSON-serialisable (and finite): {err}") from None
        with self._lock():
            old = self._read_text()
            self._parse(old)  # refuse to append to a corrupt ledger
            self._atomic_write(old + line + "\n")
        return entry

    @contextmanager
    def _lock(self):
        """Exclusive advisory lock (``<ledger>.lock``) so concurrent charges from several processes serialise."""
        target = self._target()
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(str(target) + ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise LedgerError(f"{self._where()}: cannot create lock file: {err}") from None
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def _target(self) -> Path:
        """The file the ledger really is: :attr:`path` with every symbolic link resolved (also a dangling one)."""
        return Path(os.path.realpath(self.path))

    def _where(self) -> str:
        """:attr:`path`, and the file it resolves to when that differs (for messages)."""
        target = self._target()
        return str(self.path) if target == Path(os.path.abspath(self.path)) else f"{self.path} (-> {target})"

    def _atomic_write(self, content: str) -> None:
        # atomic_write resolves a symbolic link first: replacing the link itself would turn it into a regular file
        # and fork the ledger
        try:
            atomic_write(self.path, content)
        except OSError as err:
            raise LedgerError(f"{self._where()}: cannot write ledger: {err}") from None

    # ------------------------------------------------------------------ budget
    def check(self, planned: int, budget: int = BUDGET, force: bool = False) -> None:
        """Print planned FLOPs, ledger so far and their sum against ``budget``; refuse if it would go over.

        Args:
            planned: FLOPs the coming run will spend (already multiplied: training 3× forward); int >= 0.
            budget: the total budget (default :data:`BUDGET` = 1e17).
            force: go over anyway, with a warning on stderr.

        Raises:
            BudgetExceededError: ledger + planned > budget and not ``force``.
            LedgerError: the ledger is invalid.
            ValueError: ``planned`` is not a non-negative integer (NaN, infinite, negative, fractional, a bool or
                not a number), or ``budget`` is not a positive integer; the message names the ledger file.
        """
        planned = _as_int(planned)
        if not isinstance(planned, int) or isinstance(planned, bool) or planned < 0:
            raise ValueError(f"{self.path}: planned FLOPs must be a non-negative integer, got {planned!r}")
        budget = check_budget(budget, self.path)
        spent = self.total()
        after = spent + planned
        p, s, a, b = _sci_apart(planned, spent, after, budget)
        print(f"FLOP budget: planned {p} + ledger {s} = {a} of {b} ({100 * after / budget:.1f}%) [{self.path}]")
        if after > budget:
            msg = (f"planned run ({p} FLOPs) would take the ledger {self.path} from {s} to {a}, over the budget of "
                   f"{b} by {sci(after - budget)}")
            if not force:
                raise BudgetExceededError(msg + "; reduce the run or pass --force to run anyway")
            print(f"WARNING: {msg} (--force given, running anyway)", file=sys.stderr)


def _as_int(value):
    """``value`` as an int when it is an integral number (``1e15``, a numpy integer scalar); else unchanged,
    for the caller's check to refuse (NaN, inf, 1.5, bools, strings)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real) and math.isfinite(value) and float(value).is_integer():
        return int(value)
    return value


def check_budget(budget, path) -> int:
    """``budget`` as an int (an integral float such as ``1e17`` is read as one); raises ValueError (naming the
    ledger ``path``) unless it is a positive integer."""
    budget = _as_int(budget)
    if not isinstance(budget, int) or isinstance(budget, bool) or budget <= 0:
        raise ValueError(f"{path}: budget must be a positive integer number of FLOPs, got {budget!r}")
    return budget


def _validate(entry) -> str | None:
    """Why ``entry`` is not a valid ledger entry, or None."""
    if not isinstance(entry, dict):
        return f"entry is not a JSON object: {entry!r}"[:200]
    stage, kind, flops = entry.get("stage"), entry.get("kind"), entry.get("flops")
    if not isinstance(stage, str) or not stage:
        return f"'stage' must be a non-empty string, got {stage!r}"
    if kind not in KINDS:
        return f"'kind' must be one of {KINDS}, got {kind!r}"
    if not isinstance(flops, int) or isinstance(flops, bool) or flops < 0:
        return f"'flops' must be a non-negative integer, got {flops!r}"
    return None
