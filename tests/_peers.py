"""The peers' own test suites, fetched from the package registry at test time (never copied into this
repository), and a way to run them in a child pytest.

transformers' sdist carries its common test mixins (`tests/test_modeling_common.py` and friends); timm's
carries `tests/test_models.py`. `peer_tests(name)` downloads the sdist of the *installed* version of `name`
(`pip download --no-deps --no-binary :all: NAME==VERSION`) into a cache outside the repository
(`$SWINV2_FAST_PEER_CACHE`, default `~/.cache/swinv2_fast/peers`) and returns the extracted `tests/` folder.
Without the registry the caller's test skips with the command to run, and with CI=true it fails.

`run_child_pytest(args, env)` runs pytest in a child process (`python -P`: the child's `sys.path` never
starts with the working directory, so our top-level `kernels/` folder cannot shadow Hugging Face's `kernels`
package) and returns the outcome of every test it ran, read from a JUnit XML report.
"""
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Dict, Optional, Sequence

from _utils import CI

CACHE = Path(os.environ.get("SWINV2_FAST_PEER_CACHE", Path.home() / ".cache" / "swinv2_fast" / "peers"))
# pip download of an sdist resolves its build metadata, which takes a few seconds (transformers ~10 s)
DOWNLOAD_TIMEOUT_S = 300


class PeerSuiteUnavailable(Exception):
    """The peer's sdist could not be fetched (no registry); the message says what to run."""


def download_command(name: str, version: str, dest: str = "DIR") -> list:
    return [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--no-deps",
            "--no-binary", ":all:", f"{name}=={version}", "-d", dest]


def peer_tests(name: str, version: Optional[str] = None) -> Path:
    """The `tests/` folder of `name`'s sdist at `version` (default: the installed version), fetched once."""
    version = version or importlib.metadata.version(name)
    root = CACHE / f"{name}-{version}"
    tests = root / "tests"
    if (root / ".complete").exists():
        return tests
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as scratch:
        command = download_command(name, version, scratch)
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=DOWNLOAD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            done = None
        archives = sorted(Path(scratch).glob("*.tar.gz"))
        if done is None or done.returncode != 0 or not archives:
            detail = "timed out" if done is None else (done.stderr.strip().splitlines() or ["no sdist"])[-1]
            raise PeerSuiteUnavailable(
                f"{name} {version}'s own tests come from its sdist on the package registry, which could not be "
                f"fetched ({detail}); run: {' '.join(download_command(name, version))} (the cache is {CACHE}, "
                "or set SWINV2_FAST_PEER_CACHE)")
        staged = Path(scratch) / "tree"
        with tarfile.open(archives[0]) as archive:
            members = [m for m in archive.getmembers() if m.name.split("/")[1:2] == ["tests"]]
            archive.extractall(staged, members=members, filter="data")
        extracted = next(staged.iterdir()) / "tests"
        if root.exists():
            shutil.rmtree(root)
        root.mkdir(parents=True)
        shutil.move(str(extracted), str(tests))
        (root / ".complete").write_text(archives[0].name + "\n")
    return tests


def require_peer_tests(name: str, version: Optional[str] = None) -> Path:
    """`peer_tests`, skipping the calling test (failing it with CI=true) when the registry is unreachable."""
    import pytest

    try:
        return peer_tests(name, version)
    except PeerSuiteUnavailable as error:
        if CI:
            pytest.fail(f"CI=true: the peer suite must run: {error}", pytrace=False)
        pytest.skip(str(error))


def run_child_pytest(args: Sequence[str], env: Optional[Dict[str, str]] = None, cwd: Optional[Path] = None,
                     timeout: float = 1800) -> Dict[str, str]:
    """Run `python -P -m pytest ARGS` in a child process; returns {test id: "passed" | "failed" | "skipped"}
    for every test it ran (from a JUnit XML report). Raises with the child's output tail when pytest did not
    run the session (exit status 2-4: interrupted, internal or usage error)."""
    with tempfile.TemporaryDirectory() as scratch:
        report = Path(scratch) / "report.xml"
        child_env = dict(os.environ)
        child_env.update(env or {})
        command = [sys.executable, "-P", "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
                   f"--junitxml={report}", "-o", "junit_family=xunit2", *args]
        done = subprocess.run(command, capture_output=True, text=True, env=child_env, cwd=cwd or scratch,
                              timeout=timeout)
        if done.returncode not in (0, 1, 5) or not report.exists():
            tail = (done.stdout + done.stderr)[-4000:]
            raise RuntimeError(f"child pytest exited {done.returncode}: {' '.join(command)}\n{tail}")
        outcomes = {}
        for case in ElementTree.parse(report).getroot().iter("testcase"):
            test_id = f"{case.get('classname')}::{case.get('name')}"
            if case.find("failure") is not None or case.find("error") is not None:
                outcomes[test_id] = "failed"
            elif case.find("skipped") is not None:
                outcomes[test_id] = "skipped"
            else:
                outcomes[test_id] = "passed"
        return outcomes


def counts(outcomes: Dict[str, str]) -> str:
    """'N passed, N failed, N skipped'."""
    tally = {kind: sum(1 for v in outcomes.values() if v == kind) for kind in ("passed", "failed", "skipped")}
    return ", ".join(f"{n} {kind}" for kind, n in tally.items())
