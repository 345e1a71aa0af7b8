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
    return [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--quiet",
        "--disable-pip-version-check",
        "--no-deps",
        "--no-binary",
        ":all:",
        f"{name}=={version}",
        "-d",
        dest,
    ]


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
                "or set SWINV2_FAST_PEER_CACHE)"
            )
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


def run_child_pytest(
    args: Sequence[str],
    env: Optional[Dict[str, str]] = None,
    cwd: Optional[Path] = None,
    timeout: float = 1800,
    details: Optional[Dict[str, str]] = None,
) -> Dict[str, str]:
    """Run `python -P -m pytest ARGS` in a child process; returns {test id: "passed" | "failed" | "skipped"}
    for every test it ran (from a JUnit XML report). Raises with the child's output tail when pytest did not
    run the session (exit status 2-4: interrupted, internal or usage error). `details`, when given, is
    filled with {test id: message} for the failed and skipped tests (the failure's message and the last
    lines of its traceback; the skip reason)."""
    with tempfile.TemporaryDirectory() as scratch:
        report = Path(scratch) / "report.xml"
        child_env = dict(os.environ)
        child_env.update(env or {})
        command = [
            sys.executable,
            "-P",
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-p",
            "no:randomly",
            f"--junitxml={report}",
            "-o",
            "junit_family=xunit2",
            *args,
        ]
        done = subprocess.run(
            command, capture_output=True, text=True, env=child_env, cwd=cwd or scratch, timeout=timeout
        )
        if done.returncode not in (0, 1, 5) or not report.exists():
            tail = (done.stdout + done.stderr)[-4000:]
            raise RuntimeError(f"child pytest exited {done.returncode}: {' '.join(command)}\n{tail}")
        outcomes = {}
        for case in ElementTree.parse(report).getroot().iter("testcase"):
            test_id = f"{case.get('classname')}::{case.get('name')}"
            failure = case.find("failure")
            failure = failure if failure is not None else case.find("error")
            skipped = case.find("skipped")
            if failure is not None:
                outcomes[test_id] = "failed"
                if details is not None:
                    trace = (failure.text or "").strip().splitlines()[-6:]
                    details[test_id] = "\n".join([failure.get("message", "")[:600], *trace])
            elif skipped is not None:
                outcomes[test_id] = "skipped"
                if details is not None:
                    details[test_id] = skipped.get("message", "")
            else:
                outcomes[test_id] = "passed"
        return outcomes


def counts(outcomes: Dict[str, str]) -> str:
    """'N passed, N failed, N skipped'."""
    tally = {kind: sum(1 for v in outcomes.values() if v == kind) for kind in ("passed", "failed", "skipped")}
    return ", ".join(f"{n} {kind}" for kind, n in tally.items())


# ------------------------------------------------------------------------------ transformers' mixins
# The package name the cached `tests/` folder of transformers' sdist is imported under (never "tests", which
# other suites use, and never on sys.path as a bare folder).
TRANSFORMERS_PEER_PACKAGE = "_transformers_peer_tests"
# Modules of transformers' tests/ that its common mixins import but the sdist does not ship, and the names
# they take from them: given stand-ins here (see `_transformers_stand_ins`).
TRANSFORMERS_MISSING_MODULES = {
    "exporters.test_export": ("ExportTesterMixin",),
    "generation.test_utils": ("GenerationTesterMixin",),
    "utils.test_configuration_utils": ("config_common_kwargs",),
}


def _common_config_value(field):
    """A value different from the default for one of PreTrainedConfig's dataclass fields, chosen by the
    field's default type; None for a field that is not a user setting. Raises on a field with no rule, so
    that a new common field is noticed instead of silently left out."""
    import typing

    name, default = field.name, field.default
    if name == "transformers_version":  # written by save_pretrained, not a setting
        return None
    if name == "dtype":  # ConfigTester.check_config_arguments_init expects torch.float16 back
        return "float16"
    if isinstance(default, bool):
        return not default
    if isinstance(default, int):
        return default + 5
    if name == "id2label":
        return {0: "label"}
    if name == "label2id":
        return {"label": 0}
    if name == "architectures":
        return ["Swinv2Model"]
    literals = [arg for arg in typing.get_args(field.type) if typing.get_origin(arg) is typing.Literal]
    if isinstance(field.type, str) and "Literal[" in field.type:  # postponed annotations
        return field.type.split("Literal[", 1)[1].split(",", 1)[0].strip().strip("\"'")
    if literals:
        return typing.get_args(literals[0])[0]
    raise RuntimeError(
        f"PreTrainedConfig field {name!r} (default {default!r}, type {field.type!r}) has no "
        "non-default value rule in tests/_peers.py: add one"
    )


def transformers_config_common_kwargs() -> dict:
    """Our stand-in for transformers' `tests/utils/test_configuration_utils.config_common_kwargs`: every
    common setting of `PreTrainedConfig` (its dataclass fields, and `output_attentions`, which its
    `__post_init__` takes) at a non-default value, derived from the installed transformers."""
    import dataclasses

    from transformers import PreTrainedConfig

    kwargs = {}
    for field in dataclasses.fields(PreTrainedConfig):
        value = _common_config_value(field)
        if value is not None:
            kwargs[field.name] = value
    kwargs["output_attentions"] = True
    return kwargs


def _transformers_stand_ins() -> dict:
    """{module name under the package: {attribute: value}} for TRANSFORMERS_MISSING_MODULES."""

    class ExportTesterMixin:
        """Empty: torch.export of our models is tested by tests/test_torch_compile.py and test_patch."""

    class GenerationTesterMixin:
        """Empty: generation does not apply to a vision encoder."""

    return {
        "exporters.test_export": {"ExportTesterMixin": ExportTesterMixin},
        "generation.test_utils": {"GenerationTesterMixin": GenerationTesterMixin},
        "utils.test_configuration_utils": {"config_common_kwargs": transformers_config_common_kwargs()},
    }


def import_transformers_mixins(tests_dir: Path):
    """Import transformers' common test modules from the cached sdist folder `tests_dir` as the package
    TRANSFORMERS_PEER_PACKAGE; returns (test_modeling_common, test_configuration_common, test_backbone_common).

    The folder is mapped as a package without being put on sys.path; the submodules the sdist lacks are
    registered in sys.modules first with our stand-ins. test_configuration_common runs
    `direct_transformers_import(its folder)`, which executes the folder's `__init__.py`: the sdist has
    none, so an empty one (the package marker transformers' repository has) is written into the cache."""
    import importlib
    import importlib.util
    import types

    tests_dir = Path(tests_dir)
    marker = tests_dir / "__init__.py"
    if not marker.exists():
        marker.write_text("")
    if TRANSFORMERS_PEER_PACKAGE not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            TRANSFORMERS_PEER_PACKAGE, marker, submodule_search_locations=[str(tests_dir)]
        )
        package = importlib.util.module_from_spec(spec)
        sys.modules[TRANSFORMERS_PEER_PACKAGE] = package
        spec.loader.exec_module(package)
        for dotted, attributes in _transformers_stand_ins().items():
            parts = dotted.split(".")
            for depth in range(1, len(parts) + 1):
                name = ".".join([TRANSFORMERS_PEER_PACKAGE, *parts[:depth]])
                if name not in sys.modules:
                    module = types.ModuleType(name, "stand-in written by tests/_peers.py: the sdist lacks it")
                    if depth < len(parts):
                        module.__path__ = []
                    sys.modules[name] = module
                    setattr(sys.modules[name.rsplit(".", 1)[0]], parts[depth - 1], module)
            for attribute, value in attributes.items():
                setattr(sys.modules[".".join([TRANSFORMERS_PEER_PACKAGE, *parts])], attribute, value)
    return tuple(
        importlib.import_module(f"{TRANSFORMERS_PEER_PACKAGE}.{name}")
        for name in ("test_modeling_common", "test_configuration_common", "test_backbone_common")
    )
