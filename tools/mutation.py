"""Mutation harness: does the test suite catch plausible one-line bugs?

    python -m tools.mutation                 # every mutant of tools/mutants.py
    python -m tools.mutation -k kernel       # the mutants whose name contains "kernel"
    python -m tools.mutation --list          # names, files and reasons
    python -m tools.mutation --baseline      # first run every mutant's tests on the unmutated copy
    python -m tools.mutation --check         # only check that every snippet still occurs exactly once
    python -m tools.mutation --rev HEAD      # mutate the last commit instead of the working tree

Each mutant (tools/mutants.py) replaces one exact snippet of one file, in a temporary copy of the repository
(the working tree is never touched), then runs the tests that should catch it with `pytest -x` and a time
limit. The copy is what Python imports: PYTHONPATH points at it and `swinv2_fast/kernels` links to its
`kernels/` (the editable install maps the package to the original checkout otherwise); the harness checks
that before any mutant runs. One line per mutant:

    KILLED    a test failed (pytest exit status 1)
    SURVIVED  every selected test passed
    TIMEOUT   the tests ran past --timeout (not counted as killed)
    ERROR     no snippet variant occurs exactly once (the code moved: update the snippet), or pytest did not
              run the tests (collection error, usage error; not counted as killed)

and a last line `mutants: <killed> killed of <total>`. Exit status 0 only if every mutant was killed.
Run it from the repository root before resolving a kernel or model change (minutes; --jobs runs mutants
side by side).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .mutants import MUTANTS, Mutant

ROOT = Path(__file__).resolve().parent.parent

SKIP_DIRS = {".git", ".venv", ".hypothesis", "__pycache__", ".pytest_cache", "swinv2_fast.egg-info"}


def _files():
    """The repository's files as git sees them (tracked, and untracked but not ignored); a plain walk when git
    is unavailable."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True, capture_output=True
        ).stdout
        return [p for p in out.decode().split("\0") if p and (ROOT / p).is_file()]
    except (OSError, subprocess.CalledProcessError):
        return [
            str(p.relative_to(ROOT))
            for p in ROOT.rglob("*")
            if p.is_file() and not SKIP_DIRS.intersection(p.relative_to(ROOT).parts)
        ]


def make_copy(files, dest: Path, rev: str | None = None) -> Path:
    """The working tree's files (or, with rev, that git revision's) in dest, importable from there."""
    dest.mkdir(parents=True, exist_ok=True)
    if rev is not None:
        archive = subprocess.run(
            ["git", "archive", "--format=tar", rev], cwd=ROOT, check=True, capture_output=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    else:
        for rel in files:
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, target)
    link = dest / "swinv2_fast" / "kernels"
    if not link.exists():
        link.symlink_to(Path("..") / "kernels", target_is_directory=True)
    return dest


def _env(copy: Path):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(copy) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.pop("PYTEST_ADDOPTS", None)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def check_imports_from(copy: Path) -> None:
    """The copy's package and kernels are the ones imported (not the editable install's original)."""
    probe = (
        "import swinv2_fast, swinv2_fast.functional, swinv2_fast.kernels.reference as r; "
        "print(swinv2_fast.functional.__file__); print(r.__file__)"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=copy, env=_env(copy), capture_output=True, text=True)
    paths = out.stdout.split()
    if (
        out.returncode != 0
        or len(paths) != 2
        or not all(Path(p).resolve().is_relative_to(copy.resolve()) for p in paths)
    ):
        raise SystemExit(f"mutation: the copy's package is not what Python imports there: {out.stdout}{out.stderr}")


def variants(mutant: Mutant):
    """(old, new) pairs: a mutant may list the same edit for successive versions of the code (tuples of equal
    length) while a file is being restructured."""
    olds = mutant.old if isinstance(mutant.old, tuple) else (mutant.old,)
    news = mutant.new if isinstance(mutant.new, tuple) else (mutant.new,)
    if len(olds) != len(news):
        raise SystemExit(f"mutation: {mutant.name}: {len(olds)} snippets but {len(news)} replacements")
    return list(zip(olds, news))


def locate(mutant: Mutant, text: str):
    """The (old, new) variant whose snippet occurs exactly once in text, or (None, why not)."""
    counts = [(text.count(old), old, new) for old, new in variants(mutant)]
    once = [(old, new) for n, old, new in counts if n == 1]
    if len(once) == 1 and all(n == 0 for n, old, _ in counts if old != once[0][0]):
        return once[0]
    found = ", ".join(str(n) for n, _, _ in counts)
    return None, (
        f"snippet found {found} times in {mutant.path} (expected one variant exactly once): {counts[0][1][:60]!r}"
    )


def apply(mutant: Mutant, copy: Path) -> str | None:
    """Apply the mutant to the copy; None, or why it cannot be applied."""
    path = copy / mutant.path
    if not path.is_file():
        return f"{mutant.path} does not exist"
    text = path.read_text()
    old, new = locate(mutant, text)
    if old is None:
        return new
    path.write_text(text.replace(old, new))
    return None


def _last_failure(output: str) -> str:
    for line in reversed(output.splitlines()):
        if line.startswith(("FAILED", "ERROR")):
            return line[:160]
    return output.strip().splitlines()[-1][:160] if output.strip() else ""


def run_tests(copy: Path, tests, timeout: float):
    """(status, detail, seconds) of `pytest -x tests` in the copy."""
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "--no-header", "-rfE", *tests]
    start = time.monotonic()
    try:
        out = subprocess.run(cmd, cwd=copy, env=_env(copy), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "TIMEOUT", f"ran past {timeout:.0f} s", time.monotonic() - start
    seconds = time.monotonic() - start
    output = out.stdout + out.stderr
    if out.returncode == 1:
        return "FAILED", _last_failure(output), seconds
    if out.returncode == 0:
        return "PASSED", output.strip().splitlines()[-1][:160] if output.strip() else "", seconds
    return "ERROR", f"pytest exit status {out.returncode}: {_last_failure(output)}", seconds


def run_mutant(mutant: Mutant, files, timeout: float, workdir: Path, rev: str | None = None):
    copy = Path(tempfile.mkdtemp(prefix=f"{mutant.name}-", dir=workdir))
    try:
        make_copy(files, copy, rev)
        problem = apply(mutant, copy)
        if problem:
            return "ERROR", problem, 0.0
        status, detail, seconds = run_tests(copy, mutant.tests, timeout)
        return {"FAILED": "KILLED", "PASSED": "SURVIVED"}.get(status, status), detail, seconds
    finally:
        shutil.rmtree(copy, ignore_errors=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.mutation", description=__doc__.split("\n\n")[0])
    parser.add_argument("-k", dest="select", default="", help="run the mutants whose name contains this")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument(
        "--jobs",
        type=int,
        default=int(os.environ.get("MUTATION_JOBS", "1")),
        help="mutants run at the same time (default 1, or $MUTATION_JOBS)",
    )
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per mutant's test run (300)")
    parser.add_argument(
        "--rev",
        default=None,
        help="mutate this git revision (e.g. HEAD) instead of the working tree: a stable base "
        "while files are being edited",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="only check that every snippet occurs exactly once in the working tree, run nothing",
    )
    parser.add_argument(
        "--baseline", action="store_true", help="first run each selected mutant's tests unmutated; stop if any fails"
    )
    args = parser.parse_args(argv)
    mutants = [m for m in MUTANTS if args.select in m.name]
    names = [m.name for m in MUTANTS]
    if len(set(names)) != len(names):
        raise SystemExit("mutation: mutant names must be unique")
    if args.list:
        for m in mutants:
            print(f"{m.name:40s} {m.path:38s} {m.reason}")
        return 0
    if not mutants:
        raise SystemExit(f"mutation: no mutant name contains {args.select!r}")
    if args.check:
        bad = 0
        for m in mutants:
            if args.rev:
                shown = subprocess.run(
                    ["git", "show", f"{args.rev}:{m.path}"], cwd=ROOT, capture_output=True, text=True
                )
                text = shown.stdout if shown.returncode == 0 else ""
            else:
                text = (ROOT / m.path).read_text() if (ROOT / m.path).is_file() else ""
            old, why = locate(m, text)
            bad += old is None
            print(f"{'ok' if old is not None else 'ERROR':6s} {m.name:40s} {m.path}" + ("" if old else f": {why}"))
        print(f"snippets: {len(mutants) - bad} of {len(mutants)} mutants found exactly once")
        return 0 if bad == 0 else 1
    files = _files()
    started = time.monotonic()
    os.environ.setdefault("TRITON_INTERPRET", "1")  # the children's default, as tests/conftest.py's on CPU
    with tempfile.TemporaryDirectory(prefix="swinv2-mutation-") as tmp:
        workdir = Path(tmp)
        probe = make_copy(files, workdir / "probe", args.rev)
        check_imports_from(probe)
        if args.baseline:
            for m in mutants:
                status, detail, seconds = run_tests(probe, m.tests, args.timeout)
                print(f"baseline  {m.name:40s} {status:8s} {seconds:6.1f} s  {detail}", flush=True)
                if status != "PASSED":
                    print("mutation: the unmutated code fails this mutant's tests; fix that first", flush=True)
                    return 2
        shutil.rmtree(probe)
        killed = 0
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            futures = [pool.submit(run_mutant, m, files, args.timeout, workdir, args.rev) for m in mutants]
            for m, future in zip(mutants, futures):
                status, detail, seconds = future.result()
                killed += status == "KILLED"
                print(f"{status:9s} {m.name:40s} {seconds:6.1f} s  {detail}", flush=True)
    base = f"git revision {args.rev}" if args.rev else f"the working tree ({len(files)} files)"
    print(f"mutation: {time.monotonic() - started:.0f} s in all, {args.jobs} job(s), mutants of {base}", flush=True)
    print(f"mutants: {killed} killed of {len(mutants)}", flush=True)
    return 0 if killed == len(mutants) else 1


if __name__ == "__main__":
    sys.exit(main())
