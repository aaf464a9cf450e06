"""Test helpers that bring up real cluster machinery: a one-node SLURM and network namespaces."""
import os

import pytest


def on_ci():
    """True when the CI environment variable says we run on CI (CI=true, as most CI systems set)."""
    return os.environ.get("CI", "").lower() in ("true", "1", "yes")


def require(ok, reason):
    """Skip the test when a requirement is missing; on CI (CI=true) fail instead, so CI cannot skip it."""
    if ok:
        return
    if on_ci():
        pytest.fail(f"CI=true but {reason}", pytrace=False)
    pytest.skip(reason)
