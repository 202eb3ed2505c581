"""Fixtures every test folder shares: the test bed and the guard of cluster tests.

A test that needs real services requests `testbed` (directly or through
another fixture). The first such test of a session brings the bed up when
`.testbed/env` is missing or points at a dead bed, and reuses a live one.
Tests marked `cluster` also get the guard: they fail unless KUBECONFIG is the
bed's own kubeconfig.

At the end of the session the bed stops only if a pytest session started it
and no other session still uses it; `SECAPI_TESTBED_KEEP=1` keeps it running.
A bed started with `python -m tests.testbed up` is never stopped here.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.testbed import bed
from tests.testbed.bed import Testbed
from tests.testbed.guard import ForeignClusterError, check_testbed_kubeconfig
from tests.testbed.paths import bed_paths
from tests.testbed.processes import BedError


@pytest.fixture(scope="session")
def testbed(request: pytest.FixtureRequest) -> Iterator[Testbed]:
    paths = bed_paths()
    capture = request.config.pluginmanager.getplugin("capturemanager")
    uncaptured = capture.global_and_fixture_disabled() if capture else contextlib.nullcontext()
    logger = logging.getLogger("testbed")

    # A cold start may wait minutes for the Go builds; show its progress live.
    with uncaptured:
        # Made here, so that it writes to the real stderr rather than pytest's capture.
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("testbed: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        try:
            result = bed.join_session(paths)
        except BedError as error:
            pytest.fail(f"the test bed did not start: {error}", pytrace=False)
        finally:
            logger.removeHandler(handler)

    env = bed.read_env_file(paths.env_file)
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        yield Testbed(paths=paths, env=env, started_here=not result.reused)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        keep = os.environ.get("SECAPI_TESTBED_KEEP") == "1"
        bed.leave_session(paths, keep=keep)


@pytest.fixture(scope="session")
def kubeconfig(testbed: Testbed) -> Path:
    """The test bed's admin kubeconfig, after checking that KUBECONFIG names it."""
    try:
        return check_testbed_kubeconfig(testbed.paths)
    except ForeignClusterError as error:
        pytest.fail(f"refusing to run a cluster test: {error}", pytrace=False)


@pytest.fixture(autouse=True)
def _cluster_tests_only_on_the_testbed(request: pytest.FixtureRequest) -> None:
    # Checked before every cluster test, since a test may change KUBECONFIG.
    if request.node.get_closest_marker("cluster") is not None:
        if _named_e2e_cluster(request.node.path):
            return
        request.getfixturevalue("kubeconfig")
        try:
            check_testbed_kubeconfig(bed_paths())
        except ForeignClusterError as error:
            pytest.fail(f"refusing to run a cluster test: {error}", pytrace=False)


def _named_e2e_cluster(test_file: Path) -> bool:
    # With SECAPI_E2E_BASE_URL set, tests/e2e/cluster runs against the installed cluster that
    # SECAPI_E2E_KUBECONFIG names (tests/kind/run.sh sets both). That file is accepted for this
    # suite only, and must be the file KUBECONFIG names when KUBECONFIG is set.
    named = os.environ.get("SECAPI_E2E_KUBECONFIG")
    suite = Path(__file__).parent / "e2e" / "cluster"
    if not named or not os.environ.get("SECAPI_E2E_BASE_URL"):
        return False
    if not test_file.resolve().is_relative_to(suite.resolve()):
        return False
    current = os.environ.get("KUBECONFIG")
    if current and Path(current).resolve() != Path(named).resolve():
        pytest.fail(
            f"refusing to run a cluster test: KUBECONFIG is {current}, but "
            f"SECAPI_E2E_KUBECONFIG is {named}; point both at the end-to-end cluster",
            pytrace=False,
        )
    return True
