"""Command line of the fake kubelet: `python -m tests.testbed.kubelet --kubeconfig FILE ...`."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from pathlib import Path
from types import FrameType

from .api import KubeApi
from .kubelet import Kubelet

logger = logging.getLogger("tests.testbed.kubelet")


def _read_env_file(path: Path | None) -> dict[str, str]:
    if path is None:
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise SystemExit(
            f"cannot read the env file {path}: {error}; pass a JSON object of names to values"
        ) from error
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in data.items()
    ):
        raise SystemExit(
            f"the env file {path} must hold one JSON object whose values are all strings"
        )
    return data


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tests.testbed.kubelet",
        description="Play a Kubernetes node against a real API server: run pods as local processes.",
    )
    parser.add_argument(
        "--kubeconfig", type=Path, required=True, help="kubeconfig of the API server to join"
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        required=True,
        help="folder for pod files, logs, faults.json and the ready file",
    )
    parser.add_argument(
        "--port",
        type=int,
        required=True,
        help="HTTPS port of the log server on 127.0.0.1 (0 picks a free one)",
    )
    parser.add_argument(
        "--node-name",
        default="secapi-testbed-node",
        help="name of the Node to register (default: %(default)s)",
    )
    parser.add_argument(
        "--env-file",
        type=Path,
        help="JSON object of environment variables added to every container; its PATH goes in front of the container's",
    )
    parser.add_argument(
        "--no-scheduler",
        action="store_true",
        help="do not bind unscheduled pods; run only pods whose spec.nodeName names this node",
    )
    parser.add_argument(
        "--max-pods",
        type=int,
        default=1000,
        help="pods capacity the node advertises (default: %(default)s)",
    )
    parser.add_argument(
        "--verbose", action="store_true", help="log debug messages too, such as every log request"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # urllib3 warns about every pool wait at debug level; that is noise here.
    logging.getLogger("urllib3").setLevel(logging.WARNING)

    overrides = _read_env_file(args.env_file)
    args.state_dir.mkdir(parents=True, exist_ok=True)
    kubelet = Kubelet(
        api=KubeApi(args.kubeconfig),
        node_name=args.node_name,
        state_dir=args.state_dir.resolve(),
        port=args.port,
        env_overrides=overrides,
        schedule=not args.no_scheduler,
        max_pods=args.max_pods,
    )

    stopped = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        logger.info("Received signal %s; the kubelet stops.", signal.Signals(signum).name)
        stopped.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    logger.info(
        "Starting the kubelet of node %s with state folder %s and %d environment override(s) (%s).",
        args.node_name,
        args.state_dir,
        len(overrides),
        ", ".join(sorted(overrides)) or "none",
    )
    try:
        kubelet.start()
    except Exception:
        logger.exception("The kubelet of node %s failed to start.", args.node_name)
        kubelet.stop()
        return 1
    stopped.wait()
    kubelet.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
