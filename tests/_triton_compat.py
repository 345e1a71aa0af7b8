"""Compatibility shims for running the kernel tests on other package stacks (see install())."""


def install() -> None:
    """Applied by tests/conftest.py and by the spawned workers of the distributed tests, before any kernel
    runs. Nothing to do on the pinned CI stack."""
