"""Loom's checks. `uv run nox` runs the default sessions, which are what CI runs.

uv run nox -l                      # list sessions
uv run nox -s "tests(4.57.3)"      # one transformers version
uv run nox -s tests -- -k export   # pass pytest arguments
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import nox

nox.options.default_venv_backend = "uv"
nox.options.reuse_venv = "yes"
nox.options.sessions = ["lint", "tests", "qlora", "triton_models", "build"]
# Where the environment forbids bytecode files (CI machines set PYTHONDONTWRITEBYTECODE),
# every process compiles torch's and transformers' sources again: about 6 s of the 12 s a
# CLI run takes on two cores, paid by each of the hundreds of processes the tests start.
# The caches land in the session's virtualenv and in git-ignored __pycache__ folders.
os.environ["PYTHONDONTWRITEBYTECODE"] = ""  # empty means unset to Python

ROOT = Path(__file__).parent
PACKAGES = ["core-dist", "kernels", "patchgen", "models", "trainer"]
LOCKED_TRANSFORMERS = "5.17.0"  # the version uv.lock pins and the GPU machines run
TRANSFORMERS = ["4.57.3", LOCKED_TRANSFORMERS]
# Packages that never import transformers: their tests run once, with the locked set.
TRANSFORMERS_FREE = ["packages/core-dist/tests", "packages/kernels/tests"]
# Tests are independent (temporary folders, file stores, free ports): one pytest worker
# per core, at most 4 (the e2e layouts start up to 4 ranks each). Much of a test's time is
# spent importing torch in a subprocess, which a second worker overlaps.
PARALLEL = ["-n", "auto", "--maxprocesses", "4", "--dist", "worksteal", "--durations", "25"]


# Imports every module of a package (generated ports for another transformers major aside),
# which proves its declared dependencies are enough.
IMPORT_ALL = """
import importlib, pkgutil
package = importlib.import_module("{module}")
names = [m.name for m in pkgutil.walk_packages(package.__path__, package.__name__ + ".")]
for name in names:
    if ".generated." not in name and "patch_config" not in name:
        importlib.import_module(name)
print("{module}:", len(names), "modules import")
"""


def _sync_locked(session: nox.Session) -> None:
    session.run_install(
        "uv", "sync", "--frozen", "--group", "dev",
        env={"UV_PROJECT_ENVIRONMENT": session.virtualenv.location},
    )  # fmt: skip


@nox.session
def qlora(session: nox.Session) -> None:
    """QLoRA's tests, with torchao. The tests sessions go without it: where torchao is
    installed, transformers imports it in every process (0.7 s each)."""
    session.run_install(
        "uv", "sync", "--frozen", "--group", "dev", "--group", "qlora",
        env={"UV_PROJECT_ENVIRONMENT": session.virtualenv.location},
    )  # fmt: skip
    session.run("pytest", "packages/trainer/tests/test_qlora.py", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
@nox.parametrize("transformers", TRANSFORMERS, ids=TRANSFORMERS)
def tests(session: nox.Session, transformers: str) -> None:
    if transformers == LOCKED_TRANSFORMERS:
        _sync_locked(session)
        paths = ["packages", "tests"]
    else:
        # Resolved afresh: transformers v4 needs older huggingface-hub and tokenizers.
        editable = [arg for pkg in PACKAGES for arg in ("-e", f"packages/{pkg}")]
        session.install(
            *editable, "pytest", "pytest-timeout", "pytest-xdist", "tensorboard",
            f"transformers=={transformers}",
            env={"UV_NO_CONFIG": "1"},  # the root's constraints pin the locked version
        )  # fmt: skip
        # The multi-process e2e suites (marked slow) run once, under the locked version,
        # but for a few cheap cases that prove the v4 ports in parallel (v4_parallel).
        paths = [
            "packages",
            "tests",
            "-m",
            "not slow or v4_parallel",
            *(f"--ignore={p}" for p in TRANSFORMERS_FREE),
        ]
    session.run("pytest", *(session.posargs or [*PARALLEL, *paths]))
    # Generated ports must be what their patch configs produce from this transformers.
    session.run("loom-patchgen", "check")


# One equivalence test per port (one attention backend, the fused experts): each port
# runs every kernel it calls (RMSNorm, rotary, SwiGLU, cross-entropy, MoE grouped GEMM)
# inside the model, and the interpreter is too slow for the whole matrix.
TRITON_MODELS_TESTS = [
    "packages/models/tests/test_models_patch.py",
    "packages/models/tests/test_moe.py",
    "-m",
    "not slow",
    "-k",
    "test_forward_backward_matches_upstream and (loom_varlen or (fused and not default))",
]


@nox.session
def triton_models(session: nox.Session) -> None:
    """The model-equivalence tests with the Triton kernels inside the ports: on CPU the
    dispatch picks the torch references unless Triton's interpreter is on."""
    _sync_locked(session)
    session.run(
        "pytest", *(session.posargs or TRITON_MODELS_TESTS),
        env={"TRITON_INTERPRET": "1", "LOOM_KERNELS_BACKEND": "triton"},
    )  # fmt: skip


@nox.session
def build(session: nox.Session) -> None:
    """Every wheel installs alone, with only its declared dependencies, and imports."""
    dist = Path(tempfile.mkdtemp(prefix="loom-dist-"))
    for pkg in PACKAGES:
        session.run("uv", "build", "--wheel", "--out-dir", str(dist), f"packages/{pkg}")
    # Sibling wheels are found in dist/, third-party packages on the index.
    for pkg in PACKAGES:
        module = "loom." + ("dist" if pkg == "core-dist" else pkg)
        venv = dist / f"venv-{pkg}"
        session.run("uv", "venv", "--quiet", str(venv))
        python = str(venv / "bin" / "python")
        session.run(
            "uv", "pip", "install", "--quiet", "--python", python, "--find-links", str(dist),
            f"loom-{pkg}", env={"UV_CONSTRAINT": ""},
        )  # fmt: skip
        session.run(python, "-c", IMPORT_ALL.format(module=module), external=True)
