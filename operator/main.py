"""`secapi operator`: run the Kopf operator for the current kubeconfig or service account."""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence

import kopf
import structlog

from secapi.core.settings import get_settings
from secapi.operator.app import NAMESPACES_VARIABLE

log = structlog.get_logger(__name__)


def parse_arguments(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="secapi operator",
        description="Run Scan resources as Trivy Jobs. Reads the same settings as the API "
        "(DATABASE_URL, SECAPI_SCANNER__*, SECAPI_KUBERNETES__*).",
    )
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument(
        "-n",
        "--namespace",
        action="append",
        default=[],
        help="namespace whose Scans to run; repeat for several (default: SECAPI_NAMESPACE)",
    )
    scope.add_argument(
        "-A",
        "--all-namespaces",
        action="store_true",
        help="run the Scans of every namespace (needs cluster-wide RBAC)",
    )
    parser.add_argument(
        "--liveness",
        metavar="URL",
        help="serve Kopf's liveness probe at this URL, e.g. http://0.0.0.0:8080/healthz",
    )
    parser.add_argument("--verbose", action="store_true", help="log Kopf's debug messages")
    return parser.parse_args(list(argv))


def run(argv: Sequence[str] | None = None) -> int:
    """Run the operator until SIGINT or SIGTERM; return the exit code."""
    arguments = parse_arguments(argv if argv is not None else [])
    settings = get_settings()
    namespaces = [] if arguments.all_namespaces else (arguments.namespace or [settings.namespace])

    # The handlers read the namespaces from the environment, so `kopf run` of
    # the handlers file behaves the same as this command.
    os.environ[NAMESPACES_VARIABLE] = ",".join(namespaces)
    logging.basicConfig(
        level=logging.DEBUG if arguments.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not arguments.verbose:
        # Kopf logs every handler call at INFO; the reconcile loop logs the state changes.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    log.info(
        "operator starting",
        namespaces=namespaces or "all",
        max_concurrent_scans=settings.scanner.max_concurrent_scans,
    )

    from secapi.operator import handlers  # noqa: F401  (registers the handlers)

    kopf.run(
        standalone=True,
        clusterwide=arguments.all_namespaces,
        namespaces=namespaces,
        liveness_endpoint=arguments.liveness,
    )
    return 0
