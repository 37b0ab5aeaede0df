"""Run a test function on N real processes joined in one process group: the harness of
Loom's distributed tests, importable by any package's tests (no ``sys.path`` edits).

``run_distributed(fn, world_size, *args)`` starts ``world_size`` processes, each joins
a gloo group over a FileStore (NCCL, one GPU per rank, with
``LOOM_DIST_TEST_DEVICE=cuda``), calls ``fn(*args)`` and returns every rank's return
value in rank order. An exception on any rank fails the test with that rank's
traceback; a hang fails it after ``timeout`` seconds. ``fn`` must be a module-level
function of a test file: the children load that file by path.

On CPU the processes come from a forkserver that imports torch once, so starting a
world costs tens of milliseconds instead of seconds per process (CI has 2 cores). CUDA
runs use ``spawn``: a CUDA context must never be forked.
"""

from __future__ import annotations

import importlib.util
import inspect
import multiprocessing
import os
import pickle
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

_PRELOAD = [
    "torch",
    "torch._dynamo",  # DeviceMesh slicing and FSDP import it lazily: seconds per process
    "torch.distributed.checkpoint",
    "torch.distributed.fsdp",
    "torch.distributed.tensor",
    "safetensors.torch",
    "pytest",
    "loom.dist.checkpoint",
    "loom.dist.expert_parallel",
    "loom.dist.export",
    "loom.dist.fsdp",
    "loom.dist.loading",
    "loom.dist.mesh",
    "loom.dist.plan",
    "loom.dist.ulysses",
]
_GRACE_S = 5.0  # after one rank fails, how long the others get to report before a kill


def harness_device() -> str:
    """``cpu`` (gloo) unless ``LOOM_DIST_TEST_DEVICE=cuda`` asks for NCCL on GPUs."""
    return os.environ.get("LOOM_DIST_TEST_DEVICE", "cpu")


def _context(device: str) -> multiprocessing.context.BaseContext:
    if device == "cuda":
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(_PRELOAD)
    return context


def start_workers() -> None:
    """Start the CPU forkserver in the background (it imports torch once, for everyone)."""
    if harness_device() == "cpu":
        from multiprocessing import forkserver

        _context("cpu")
        forkserver.ensure_running()


def _load(path: str, qualname: str) -> Callable[..., Any]:
    name = f"_loom_dist_test_{Path(path).stem}"
    module = sys.modules.get(name)
    if module is None:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return getattr(module, qualname)


def _worker(rank: int, world: int, workdir: str, target: tuple[str, str], args, device, timeout):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    if device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # init_parallel must pick the CPU
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)  # N ranks share the machine's cores
    kwargs = {}
    if device == "cuda":
        torch.cuda.set_device(rank)
        kwargs["device_id"] = torch.device("cuda", rank)
    dist.init_process_group(
        "cpu:gloo,cuda:nccl" if device == "cuda" else "gloo",
        store=dist.FileStore(os.path.join(workdir, "store"), world),
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=timeout),
        **kwargs,
    )
    try:
        result = ("ok", _load(*target)(*args))
    except BaseException:
        result = ("error", traceback.format_exc())
    with open(os.path.join(workdir, f"result_{rank}.pkl"), "wb") as f:
        pickle.dump(result, f)
    dist.destroy_process_group()


def _wait(procs: list, timeout: float, expect_exit: int | None) -> None:
    deadline, failed_at = time.monotonic() + timeout, None
    while any(p.is_alive() for p in procs):
        now = time.monotonic()
        failed = any(p.exitcode not in (None, 0, expect_exit) for p in procs)
        if failed and failed_at is None:
            failed_at = now
        if now > deadline or (failed_at is not None and now - failed_at > _GRACE_S):
            hung = [rank for rank, p in enumerate(procs) if p.is_alive()]
            for p in procs:
                if p.is_alive():
                    p.kill()
                    p.join()
            if not failed:
                raise TimeoutError(f"ranks {hung} still running after {timeout:.0f} s")
            return
        time.sleep(0.02)


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 120.0,
    expect_exit: int | None = None,
) -> list[Any]:
    """Run ``fn(*args)`` on ``world_size`` ranks; return their results in rank order.

    ``expect_exit``: every rank is expected to leave with this exit code (``os._exit``
    inside ``fn``) instead of returning; the result list is then empty.
    """
    device = harness_device()
    if device == "cuda":
        import torch

        if torch.cuda.device_count() < world_size:
            import pytest  # a test dependency, not one of loom-core-dist's

            pytest.skip(f"needs {world_size} GPUs, found {torch.cuda.device_count()}")
    workdir = tempfile.mkdtemp(prefix="loom-dist-")
    try:
        context = _context(device)
        target = (inspect.getfile(fn), fn.__qualname__)
        procs = [
            context.Process(
                target=_worker,
                args=(rank, world_size, workdir, target, args, device, timeout),
            )
            for rank in range(world_size)
        ]
        for p in procs:
            p.start()
        _wait(procs, timeout, expect_exit)
        if expect_exit is not None:
            codes = [p.exitcode for p in procs]
            assert codes == [expect_exit] * world_size, f"exit codes {codes}"
            return []
        return _results(workdir, [p.exitcode for p in procs])
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _results(workdir: str, exitcodes: list[int | None]) -> list[Any]:
    """Every rank's value, or an error with every failed rank's traceback (a rank killed
    while waiting for a failed peer only reports its exit code)."""
    outcomes = []
    for rank, code in enumerate(exitcodes):
        path = os.path.join(workdir, f"result_{rank}.pkl")
        if os.path.exists(path):
            with open(path, "rb") as f:
                outcomes.append(pickle.load(f))
        else:
            outcomes.append(("lost", f"exited with code {code} and no result"))
    failures = [
        f"rank {rank} failed:\n{value}"
        for rank, (status, value) in enumerate(outcomes)
        if status != "ok"
    ]
    if failures:  # every rank's story: the first to fail is not always rank 0
        raise AssertionError("\n".join(failures))
    return [value for _, value in outcomes]


def assert_close(actual, expected, what: str, rtol: float = 1e-5) -> None:
    """Elementwise ``|actual - expected| <= rtol * max|expected|``: relative to the
    tensor's scale, so entries near zero do not need an absolute tolerance of their own."""
    import torch

    actual = torch.as_tensor(actual).detach().cpu().double()
    expected = torch.as_tensor(expected).detach().cpu().double()
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    error = float((actual - expected).abs().max()) if expected.numel() else 0.0
    assert error <= rtol * scale + 1e-12, (
        f"{what}: max abs error {error:.3e} > {rtol:g} x scale {scale:.3e}"
    )


def rank_device():
    """The device this rank computes on (its GPU under NCCL, else the CPU)."""
    import torch

    if harness_device() == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
