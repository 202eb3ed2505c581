"""Command line of the test bed: `python -m tests.testbed up|down|status`."""

from __future__ import annotations

import argparse
import logging
import sys

from tests.testbed import bed
from tests.testbed.paths import bed_paths
from tests.testbed.processes import BedError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.testbed",
        description=(
            "Run SecAPI's test bed on 127.0.0.1: PostgreSQL, Redis, an OCI registry with the "
            "fixture images, a fixture Trivy DB, etcd, kube-apiserver, kube-controller-manager "
            "and the fake kubelet. State lives in $SECAPI_TESTBED_DIR (default <repo>/.testbed)."
        ),
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("up", help="start the bed (or reuse a live one) and write .testbed/env")
    commands.add_parser("down", help="stop every process the bed started and remove its data")
    commands.add_parser("status", help="report each part; exit code 0 only when all are up")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="testbed: %(message)s", stream=sys.stderr)
    paths = bed_paths()
    try:
        if args.command == "up":
            bed.up(paths)
            print(paths.env_file)
            return 0
        if args.command == "down":
            bed.down(paths)
            return 0
        healthy, report = bed.status(paths)
        print(report)
        return 0 if healthy else 1
    except BedError as error:
        logging.getLogger("testbed").error("%s", error)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
