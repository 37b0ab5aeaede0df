"""Resume under real faults: ``loom train`` is SIGKILLed from outside (its whole process
group) at random moments, mid-step and mid-save, and rerun with the same command until it
finishes; every loss and grad norm it ever logged, and the exported ``hf/`` files, must
equal an uninterrupted run's bit for bit.

Kill moments are drawn from the test's seed and printed (``pytest -s``), so a failure can
be replayed. Each start of ``loom train`` would spend most of its time importing torch and
transformers; the runs are instead forked from one process that has imported them
(``Launcher``): each child is its own session, runs ``loom.trainer.cli.main`` with the
command's arguments, and is killed as a process group, as a scheduler would kill it.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "examples/tiny/train.yaml"
STEPS = 8
ARGS = [
    "train", str(CONFIG), "--train.steps", str(STEPS), "--checkpoint.every", "1",
    "--data.max_seq_len", "64", "--train.global_batch_size", "4",
    "--train.micro_batch_size", "2", "--log.progress", "false",
]  # fmt: skip
KILLS_PER_SEED = 6
SAME = ("loss", "grad_norm", "loss_tokens", "lr", "tokens")  # what a resumed step must repeat

# Runs in the launcher process: imports once, then forks one child per request.
START = "--- loom train starts ---"
_LAUNCHER = r"""
import json, os, sys, traceback
START = sys.argv[1]  # marks each run's start in its log
import matplotlib.pyplot  # every run plots its metrics at the end
import loom.trainer.train
from loom.trainer.cli import main

for line in sys.stdin:
    request = json.loads(line)
    if "wait" in request:
        _, status = os.waitpid(request["wait"], 0)
        print(os.waitstatus_to_exitcode(status), flush=True)
        continue
    pid = os.fork()
    if pid == 0:
        os.setsid()  # its own process group, killed whole
        log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        os.dup2(log, 1)
        os.dup2(log, 2)
        print(START, flush=True)
        os.environ.update(request["env"])
        try:
            code = main(request["argv"])
        except SystemExit as exit:
            code = exit.code if isinstance(exit.code, int) else 1
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code or 0)
    print(pid, flush=True)
os._exit(0)  # skips the interpreter's slow teardown of torch and friends
"""


class Launcher:
    """Starts ``loom train`` runs as forks of one warmed-up process (see module doc)."""

    def __init__(self) -> None:
        self._process = subprocess.Popen(
            [sys.executable, "-c", _LAUNCHER, START], cwd=ROOT, text=True,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            env={**os.environ, "MPLBACKEND": "Agg", "COLUMNS": "500"},  # no wrapped log lines
        )  # fmt: skip

    def _ask(self, request: dict) -> int:
        self._process.stdin.write(json.dumps(request) + "\n")
        self._process.stdin.flush()
        answer = self._process.stdout.readline()
        assert answer, f"launcher died with code {self._process.wait()}"
        return int(answer)

    def start(self, out: Path, seed: int, *extra: str, env: dict | None = None) -> int:
        argv = [*ARGS, "--train.seed", str(seed), "--train.output_dir", str(out), *extra]
        log = str(out.parent / f"{out.name}.log")
        return self._ask({"argv": argv, "log": log, "env": env or {}})

    def wait(self, pid: int) -> int:
        return self._ask({"wait": pid})

    def close(self) -> None:
        self._process.stdin.close()
        self._process.wait(timeout=60)


@pytest.fixture(scope="module")
def launcher():
    launcher = Launcher()
    yield launcher
    launcher.close()


@dataclass
class Kill:
    phase: str  # "start": after launch; "step": once step_<step> is saved; "save": mid-save
    step: int
    delay: float  # seconds after that moment


def kill_plan(seed: int) -> list[Kill]:
    """One kill soon after launch (before or after the first checkpoint), kills at
    increasing steps, each mid-step or mid-save, and one once the last step is saved:
    in the HF export or the plots."""
    rng = random.Random(seed)
    # A whole run takes about a second and a half once forked: kill well inside it.
    plan = [Kill("start", 0, round(rng.uniform(0.0, 0.6), 3))]
    for step in sorted(rng.sample(range(1, STEPS), KILLS_PER_SEED - 2)):
        phase = rng.choice(["step", "save"])
        delay = rng.uniform(0.0, 0.25) if phase == "step" else rng.uniform(0.0, 0.08)
        plan.append(Kill(phase, step, round(delay, 3)))
    return [*plan, Kill("step", STEPS, round(rng.uniform(0.0, 0.3), 3))]


def metrics(out: Path) -> list[dict]:
    """metrics.jsonl's records; a line a kill cut short is left out."""
    path = out / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            assert i == len(lines) - 1, f"a broken line before the last: {line!r}"
    return records


def checkpoints(out: Path) -> list[str]:
    root = out / "checkpoints"
    return sorted(os.listdir(root)) if root.is_dir() else []


def complete_steps(out: Path) -> list[int]:
    """Steps of the ``step_<N>`` folders; each must be a whole checkpoint."""
    steps = []
    for name in checkpoints(out):
        if name.startswith("step_"):
            assert (out / "checkpoints" / name / ".metadata").is_file(), f"{name} is half written"
            steps.append(int(name.removeprefix("step_")))
    return sorted(steps)


def wait_for(phase: str, step: int, out: Path, pid: int, launched: float) -> str:
    """Return at the moment a kill counts from: once ``step_<step>`` is saved ("step"), or
    once this run has started saving it ("save"; or has saved it, if the save was over
    before a poll saw it). Polls every millisecond or so; returns what it saw."""
    root, deadline = out / "checkpoints", time.monotonic() + 300
    partial, final = root / f".step_{step}.partial", root / f"step_{step}"
    while phase != "start":
        if final.is_dir():
            return final.name
        if phase == "save":
            try:
                if partial.stat().st_ctime >= launched:  # not one an earlier kill left
                    return partial.name
            except FileNotFoundError:
                pass
        if time.monotonic() > deadline or _exited(pid):
            log = (out.parent / f"{out.name}.log").read_text()
            pytest.fail(f"run ended before step {step}'s save ({phase}):\n{log}")
        time.sleep(0.001)
    return "launch"


def _exited(pid: int) -> bool:
    # The run is the launcher's child: a zombie once it exits.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] == "Z"
    except FileNotFoundError:
        return True


def kill_and_resume(launcher: Launcher, out: Path, seed: int) -> tuple[list[dict], list[dict]]:
    """Run, kill and rerun per the seed's plan, then run to the end; return what each
    kill left and every metrics record the killed runs logged."""
    observed, seen, newest = [], [], 0
    for moment in kill_plan(seed):
        # The plan's step, or the first one this run still has to save.
        step = min(max(moment.step, newest + 1), STEPS) if moment.phase != "start" else 0
        launched = time.time()
        pid = launcher.start(out, seed)
        saw = wait_for(moment.phase, step, out, pid, launched)
        time.sleep(moment.delay)
        os.killpg(pid, signal.SIGKILL)
        code = launcher.wait(pid)
        records = metrics(out)
        seen.extend(records)
        complete = complete_steps(out)
        newest = max(complete, default=0)
        observed.append({
            "kill": moment, "step": step, "saw": saw, "code": code, "logged": len(records),
            "checkpoints": checkpoints(out), "complete": complete,
        })  # fmt: skip
        print(f"seed {seed}: {observed[-1]}")
    pid = launcher.start(out, seed)
    assert launcher.wait(pid) == 0, (out.parent / f"{out.name}.log").read_text()
    return observed, seen


KILLED_EARLY = "killed before it looked for a checkpoint"


def resumed_from(log: str) -> list[int | str | None]:
    """The step each start of the run resumed from: None where it started at step 0,
    KILLED_EARLY where it was killed before it said."""
    found = []
    for start in log.split(START)[1:]:
        lines = start.splitlines()
        line = next((x for x in lines if x.startswith("resumed from")), None)
        if line:
            found.append(int(line.split("step_")[1].split()[0]))
        else:
            fresh = any(x.startswith("no checkpoint in") for x in lines)
            found.append(None if fresh else KILLED_EARLY)
    return found


def hf_files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "hf").iterdir())}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, launcher):
    """The run directory of an uninterrupted run, per seed."""
    runs: dict[int, Path] = {}

    def run(seed: int) -> Path:
        if seed not in runs:
            out = tmp_path_factory.mktemp(f"straight{seed}") / "run"
            code = launcher.wait(launcher.start(out, seed))
            assert code == 0, out.with_suffix(".log").read_text()
            runs[seed] = out
        return runs[seed]

    return run


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_sigkill_at_random_moments_resumes_exactly(tmp_path, launcher, uninterrupted, seed):
    straight = uninterrupted(seed)
    want = {r["step"]: r for r in metrics(straight)}

    out = tmp_path / "killed"
    observed, seen = kill_and_resume(launcher, out, seed)
    # A code 0 would be a run that ended before its kill: the plan's moments are too late.
    assert all(o["code"] == -signal.SIGKILL for o in observed), observed

    # Each rerun picked the newest whole checkpoint the kill left, never a partial one.
    log = (tmp_path / "killed.log").read_text()
    picked = resumed_from(log)
    newest = [None] + [max(o["complete"], default=None) for o in observed]
    assert len(picked) == len(newest) and picked[-1] == STEPS, (picked, observed)
    decided = [(p, n) for p, n in zip(picked, newest, strict=True) if p != KILLED_EARLY]
    assert all(p == n for p, n in decided), (picked, observed)
    assert not [n for n in checkpoints(out) if n.endswith(".partial")]

    records = metrics(out)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    for got in [*seen, *records]:  # every record any attempt logged, killed ones too
        ref = want[got["step"]]
        for key in SAME:
            assert got[key] == ref[key], (key, got, ref)
    assert hf_files(out) == hf_files(straight)


@pytest.mark.slow
def test_rerun_after_a_kill_before_the_first_checkpoint(tmp_path, launcher, uninterrupted):
    out = tmp_path / "run"
    killed = launcher.start(out, 0, env={"LOOM_TEST_KILL_AFTER_STEP": "1"})  # before saving
    assert launcher.wait(killed) == -signal.SIGKILL
    assert len(metrics(out)) == 1 and not complete_steps(out)
    assert launcher.wait(launcher.start(out, 0)) == 0, (tmp_path / "run.log").read_text()
    records = metrics(out)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    for got, want in zip(records, metrics(uninterrupted(0)), strict=True):
        assert all(got[key] == want[key] for key in SAME), (got, want)
    assert hf_files(out) == hf_files(uninterrupted(0))
