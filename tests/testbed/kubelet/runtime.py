"""The life of one pod on the node, from ContainerCreating to its final status.

A `PodWorker` thread per pod prepares volumes, runs init containers one after
the other, then starts all main containers as local processes, applies the
pod's faults, restarts containers as the restart policy requires, and reports
every change through `pods/NAME/status`. It sleeps on an event between changes,
so a running pod costs no CPU of the kubelet.
"""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import urllib3

from .api import ApiError, pod_path
from .containers import build_process_spec
from .faults import Fault
from .logs import ContainerLog, LogOptions, read_log
from .pump import ProcessHandle
from .sources import ConfigError, SourceCache
from .status import Conditions, ContainerState, pod_phase, pod_status
from .volumes import prepare_volumes

if TYPE_CHECKING:
    from .kubelet import Kubelet

logger = logging.getLogger(__name__)

# Seconds between retries of a container whose Secret or ConfigMap is missing.
CONFIG_RETRY_SECONDS = 2.0
# Seconds from ErrImagePull to ImagePullBackOff under the image-pull fault.
IMAGE_PULL_BACKOFF_SECONDS = 2.0
# The maximum grace period honoured on deletion, because test processes stop fast.
MAX_GRACE_SECONDS = 10.0
# Restart back-off of OnFailure and Always containers: doubles up to the maximum.
RESTART_BACKOFF = (1.0, 10.0)


def exit_code_of(returncode: int) -> int:
    """Map a Popen return code to a container exit code (128 + signal for a killed process)."""
    return 128 - returncode if returncode < 0 else returncode


def process_start_ticks(pid: int) -> int | None:
    """Return a process's start time in clock ticks since boot, or None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 22 of stat; the command name in field 2 may contain spaces.
    return int(stat.rsplit(")", 1)[1].split()[19])


@dataclass
class PodRecord:
    """What the kubelet keeps about a pod on its node, also after its worker ends."""

    uid: str
    namespace: str
    name: str
    folder: Path
    pod: dict[str, Any]
    faults: list[Fault] = field(default_factory=list)
    live_logs: dict[str, ContainerLog] = field(default_factory=dict)
    # Set when the pod left the API server while its worker still ran.
    gone: bool = False

    def has_fault(self, kind: str) -> bool:
        return any(fault.kind == kind for fault in self.faults)

    def fault(self, kind: str) -> Fault | None:
        return next((fault for fault in self.faults if fault.kind == kind), None)

    def log_path(self, container: str, attempt: int) -> Path:
        return self.folder / "logs" / container / f"{attempt}.log"

    def attempts(self, container: str) -> list[int]:
        """Return the run numbers of a container that have a log, oldest first."""
        folder = self.folder / "logs" / container
        if not folder.is_dir():
            return []
        return sorted(int(path.stem) for path in folder.glob("*.log") if path.stem.isdigit())


class PodStopped(Exception):
    """The pod's worker was asked to stop while it waited."""


class PodWorker(threading.Thread):
    """Runs one pod; `request_stop` ends it early."""

    def __init__(self, kubelet: Kubelet, record: PodRecord) -> None:
        super().__init__(name=f"pod-{record.namespace}-{record.name}", daemon=True)
        self.kubelet = kubelet
        self.record = record
        self.pod = record.pod
        spec = self.pod["spec"]
        self.restart_policy = spec.get("restartPolicy", "Always")
        self.init = [
            ContainerState(c["name"], c.get("image", "")) for c in spec.get("initContainers") or []
        ]
        self.main = [ContainerState(c["name"], c.get("image", "")) for c in spec["containers"]]
        self.conditions = Conditions()
        self.start_time = time.time()
        self.sandbox_ready = False
        self.handles: dict[str, ProcessHandle] = {}
        self.volumes: dict[str, Path] = {}
        self.stop_reason: str | None = None
        self.pod_reason = ""
        self.pod_message = ""
        self._changed = threading.Event()
        self._last_status: dict[str, Any] | None = None
        self._last_phase = ""

    @property
    def label(self) -> str:
        return f"{self.record.namespace}/{self.record.name}"

    def request_stop(self, reason: str) -> None:
        """Ask the worker to stop: `deleted` (confirm the deletion), `gone` or `shutdown`."""
        if self.stop_reason is None or reason == "gone":
            self.stop_reason = reason
        self._changed.set()

    def run(self) -> None:
        try:
            self._run()
        except PodStopped:
            pass
        except Exception:
            logger.exception("The worker of pod %s failed; the pod is marked Failed.", self.label)
            self.pod_reason, self.pod_message = (
                "KubeletError",
                "The test bed kubelet failed while running this pod; see its log.",
            )
            self._end_containers(reason="Error")
            self._report(final=True)
        self._finish()

    # -- the steps of a pod -------------------------------------------------

    def _run(self) -> None:
        if self.stop_reason is not None:
            raise PodStopped
        self._report()
        if self.record.has_fault("image-pull"):
            self._fail_image_pull()
            return

        delay = self.record.fault("delay-start")
        if delay is not None:
            logger.info(
                "Pod %s waits %.1f s before it starts (fault delay-start).", self.label, delay.delay
            )
            self._sleep(delay.delay)

        self.volumes = self._retry_config(self.main, lambda: self._prepare_volumes())
        self.sandbox_ready = True
        self._report()

        spec = self.pod["spec"]
        for container, state in zip(spec.get("initContainers") or [], self.init, strict=True):
            if not self._run_init_container(container, state):
                self._report(final=True)
                return

        for container, state in zip(spec["containers"], self.main, strict=True):
            self._start(container, state)
        self._report()
        self._supervise()

    def _prepare_volumes(self) -> dict[str, Path]:
        return prepare_volumes(self.pod, self.record.folder / "volumes", self._sources())

    def _sources(self) -> SourceCache:
        return SourceCache(self.kubelet.api, self.record.namespace)

    def _retry_config(self, states: list[ContainerState], step: Callable[[], Any]) -> Any:
        """Run `step` until no referenced object is missing, reporting why the containers wait."""
        while True:
            try:
                return step()
            except ConfigError as error:
                reason = "CreateContainerConfigError" if self.sandbox_ready else "ContainerCreating"
                for state in states:
                    state.wait(reason, str(error))
                logger.warning(
                    "Pod %s cannot start yet: %s. The kubelet retries.", self.label, error
                )
                self._report()
                self._sleep(CONFIG_RETRY_SECONDS)

    def _fail_image_pull(self) -> None:
        images = ", ".join(sorted({state.image for state in self.init + self.main}))
        logger.info("Pod %s never pulls its image %s (fault image-pull).", self.label, images)
        first = self.init[0] if self.init else None
        waiting = [first] if first else self.main
        for state in waiting:
            state.wait(
                "ErrImagePull",
                f'Failed to pull image "{state.image}": the test bed fault image-pull rejects every '
                "pull of this pod",
            )
        self._report()
        self._sleep(IMAGE_PULL_BACKOFF_SECONDS)
        for state in waiting:
            state.wait(
                "ImagePullBackOff",
                f'Back-off pulling image "{state.image}": ErrImagePull: the test bed fault '
                "image-pull rejects every pull of this pod",
            )
        self._report()
        self._sleep(None)

    def _run_init_container(self, container: dict[str, Any], state: ContainerState) -> bool:
        """Run one init container to its end; return whether the pod may go on."""
        backoff = RESTART_BACKOFF[0]
        while True:
            self._start(container, state)
            self._report()
            handle = self.handles.get(state.name)
            while handle is not None and not handle.exited.is_set():
                self._sleep(None)
            if handle is not None:
                self._record_exit(state, handle)
            if state.succeeded:
                return True
            if self.restart_policy == "Never":
                return False
            self._report()
            self._sleep(backoff)
            backoff = min(backoff * 2, RESTART_BACKOFF[1])
            state.restart()

    def _start(self, container: dict[str, Any], state: ContainerState) -> None:
        """Start a container's process, or record why it could not start."""
        # The handle of an earlier run must not stand for this one.
        self.handles.pop(state.name, None)
        process_spec = self._retry_config(
            [state],
            lambda: build_process_spec(
                self.pod,
                container,
                volumes=self.volumes,
                work_dir=self._work_dir(),
                overrides=self.kubelet.env_overrides,
                base_path=self.kubelet.base_path,
                sources=self._sources(),
                allocatable=self.kubelet.allocatable,
            ),
        )
        log = ContainerLog(self.record.log_path(state.name, state.restart_count))
        container_id = f"testbed://{self.record.uid}/{state.name}/{state.restart_count}"
        try:
            process = subprocess.Popen(
                process_spec.argv,
                env=process_spec.env,
                cwd=process_spec.cwd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
        except OSError as error:
            log.close()
            state.run(container_id, time.time())
            state.terminate(
                128,
                "StartError",
                f"failed to start container process: exec: {process_spec.argv[0]!r}: {error.strerror}",
            )
            logger.warning(
                "Container %s of pod %s could not start: exec %r failed: %s.",
                state.name,
                self.label,
                process_spec.argv[0],
                error.strerror,
            )
            return

        handle = ProcessHandle(process=process, log=log, on_exit=self._changed.set)
        self.handles[state.name] = handle
        self.record.live_logs[state.name] = log
        self._remember_processes()
        self.kubelet.pump.watch(handle)
        state.run(container_id, handle.started_at)
        logger.info(
            "Started container %s of pod %s as process %d.", state.name, self.label, process.pid
        )

    def _work_dir(self) -> Path:
        folder = self.record.folder / "work"
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def _supervise(self) -> None:
        """Wait for the main containers to end, applying faults, deadlines and restarts."""
        started = time.monotonic()
        oom = self.record.fault("oom")
        vanish = self.record.fault("vanish")
        hang = self.record.has_fault("hang")
        deadline = self.pod["spec"].get("activeDeadlineSeconds")
        restart_at: dict[str, float] = {}
        backoff: dict[str, float] = {}
        oom_fired = False

        while True:
            now = time.monotonic()
            if vanish is not None and (now - started >= vanish.delay or self._any_exited()):
                self._vanish()
                return
            if oom is not None and not oom_fired and now - started >= oom.delay:
                oom_fired = True
                logger.info("Killing pod %s as if out of memory (fault oom).", self.label)
                for handle in self.handles.values():
                    handle.signal_group(signal.SIGKILL)
            if deadline is not None and time.time() - self.start_time >= float(deadline):
                self._exceed_deadline()
                return

            for container, state in zip(self.pod["spec"]["containers"], self.main, strict=True):
                running = self.handles.get(state.name)
                if (
                    state.state == "running"
                    and running is not None
                    and running.exited.is_set()
                    and not hang
                ):
                    self._record_exit(state, running, oom_killed=oom is not None)
                    if self._should_restart(state):
                        delay = backoff.get(state.name, RESTART_BACKOFF[0])
                        backoff[state.name] = min(delay * 2, RESTART_BACKOFF[1])
                        restart_at[state.name] = now + delay
                    self._report()
                if state.name in restart_at and now >= restart_at[state.name]:
                    del restart_at[state.name]
                    state.restart()
                    self._start(container, state)
                    self._report()

            if all(state.state == "terminated" for state in self.main) and not restart_at:
                self._report(final=True)
                return

            timers = list(restart_at.values())
            if vanish is not None:
                timers.append(started + vanish.delay)
            if oom is not None and not oom_fired:
                timers.append(started + oom.delay)
            if deadline is not None:
                timers.append(now + (self.start_time + float(deadline) - time.time()))
            self._sleep(max(0.0, min(timers) - time.monotonic()) if timers else None)

    def _any_exited(self) -> bool:
        return any(handle.exited.is_set() for handle in self.handles.values())

    def _should_restart(self, state: ContainerState) -> bool:
        if self.restart_policy == "Always":
            return True
        return self.restart_policy == "OnFailure" and not state.succeeded

    def _record_exit(
        self, state: ContainerState, handle: ProcessHandle, *, oom_killed: bool = False
    ) -> None:
        assert handle.returncode is not None
        self.record.live_logs.pop(state.name, None)
        if oom_killed:
            state.terminate(137, "OOMKilled", finished_at=handle.finished_at)
        else:
            code = exit_code_of(handle.returncode)
            state.terminate(
                code, "Completed" if code == 0 else "Error", finished_at=handle.finished_at
            )
            if code != 0:
                state.message = self._fallback_message(state)
        logger.info(
            "Container %s of pod %s ended with exit code %d (%s).",
            state.name,
            self.label,
            state.exit_code,
            state.reason,
        )

    def _fallback_message(self, state: ContainerState) -> str:
        """Return the end of the log as the termination message, for FallbackToLogsOnError."""
        spec = self.pod["spec"]
        containers: list[dict[str, Any]] = (spec.get("initContainers") or []) + spec["containers"]
        container = next((c for c in containers if c["name"] == state.name), {})
        if container.get("terminationMessagePolicy") != "FallbackToLogsOnError":
            return ""
        path = self.record.log_path(state.name, state.restart_count)
        # The real kubelet keeps at most the last 80 lines and 2048 bytes.
        tail = read_log(path, LogOptions(tail_lines=80))
        return tail[-2048:].decode("utf-8", "replace")

    def _vanish(self) -> None:
        logger.info(
            "Pod %s vanishes: its processes are killed and the pod is deleted (fault vanish).",
            self.label,
        )
        self._kill_all(grace=0)
        self.kubelet.delete_pod(self.pod, vanished=True)
        if self.stop_reason is None:
            self.stop_reason = "vanished"

    def _exceed_deadline(self) -> None:
        logger.info(
            "Pod %s ran longer than its activeDeadlineSeconds; the kubelet stops it.", self.label
        )
        self._kill_all(grace=self._grace_seconds())
        self._end_containers(reason="Error")
        self.pod_reason = "DeadlineExceeded"
        self.pod_message = "Pod was active on the node longer than the specified deadline"
        self._report(final=True)

    # -- stopping ------------------------------------------------------------

    def _stop(self) -> None:
        reason = self.stop_reason
        if reason == "deleted":
            grace = self._grace_seconds()
            logger.info(
                "Pod %s is being deleted; stopping its containers (grace %.0f s).",
                self.label,
                grace,
            )
            self._kill_all(grace=grace)
            if pod_phase(self.init, self.main, self.restart_policy) not in ("Succeeded", "Failed"):
                self._end_containers(reason="Error")
                self._report(final=True, force_failed=True)
            self.kubelet.delete_pod(self.pod)
        else:
            self._kill_all(grace=0)

    def _grace_seconds(self) -> float:
        grace = self.pod["metadata"].get("deletionGracePeriodSeconds")
        if grace is None:
            grace = self.pod["spec"].get("terminationGracePeriodSeconds", 30)
        return min(float(grace), MAX_GRACE_SECONDS)

    def _kill_all(self, *, grace: float) -> None:
        """Stop every process: SIGTERM, then SIGKILL after `grace` seconds."""
        running = [handle for handle in self.handles.values() if not handle.exited.is_set()]
        if not running:
            return
        if grace > 0:
            for handle in running:
                handle.signal_group(signal.SIGTERM)
            deadline = time.monotonic() + grace
            for handle in running:
                handle.exited.wait(max(0.0, deadline - time.monotonic()))
        for handle in running:
            handle.signal_group(signal.SIGKILL)
        for handle in running:
            if not handle.exited.wait(5.0):
                logger.warning(
                    "Process %d of pod %s did not end after SIGKILL.", handle.pid, self.label
                )

    def _end_containers(self, *, reason: str) -> None:
        """Record every unfinished container as ended, after its processes were stopped."""
        for state in self.init + self.main:
            if state.state == "terminated":
                continue
            handle = self.handles.get(state.name)
            if state.state == "running" and handle is not None and handle.returncode is not None:
                state.terminate(
                    exit_code_of(handle.returncode), reason, finished_at=handle.finished_at
                )
            elif state.state == "running":
                state.terminate(137, reason)
            else:
                state.terminate(
                    137,
                    "ContainerStatusUnknown",
                    "The container could not be located when the pod was terminated",
                )

    # -- plumbing ------------------------------------------------------------

    def _sleep(self, seconds: float | None) -> None:
        """Wait for a process exit, a stop request or `seconds`; raise PodStopped on a stop."""
        if self.stop_reason is None:
            self._changed.wait(seconds)
            self._changed.clear()
        if self.stop_reason is not None:
            raise PodStopped

    def _finish(self) -> None:
        if self.stop_reason is not None:
            try:
                self._stop()
            except Exception:
                logger.exception("Stopping pod %s failed.", self.label)
        for state in self.init + self.main:
            self.record.live_logs.pop(state.name, None)
        self.kubelet.worker_done(self)

    def _remember_processes(self) -> None:
        """Write the process ids, so a restarted kubelet can stop what this one left."""
        entries = {
            name: {"pid": handle.pid, "start_ticks": process_start_ticks(handle.pid)}
            for name, handle in self.handles.items()
        }
        (self.record.folder / "processes.json").write_text(json.dumps(entries))

    def _report(self, *, final: bool = False, force_failed: bool = False) -> None:
        """Send the pod's status; a final status is retried until it is stored."""
        phase = pod_phase(self.init, self.main, self.restart_policy)
        if force_failed or self.pod_reason:
            phase = "Failed"
        status = pod_status(
            phase=phase,
            init=self.init,
            main=self.main,
            conditions=self.conditions,
            start_time=self.start_time,
            sandbox_ready=self.sandbox_ready,
            reason=self.pod_reason,
            message=self.pod_message,
        )
        if status == self._last_status:
            return
        attempts = 10 if final else 1
        for attempt in range(attempts):
            try:
                self.kubelet.api.patch(
                    pod_path(self.record.namespace, self.record.name, "status"), {"status": status}
                )
            except ApiError as error:
                if error.status == 404:
                    self.request_stop("gone")
                    return
                failure: Exception = error
            except (urllib3.exceptions.HTTPError, OSError) as error:
                failure = error
            else:
                self._last_status = status
                if phase != self._last_phase:
                    logger.info("Pod %s is %s.", self.label, phase)
                    self._last_phase = phase
                return
            logger.warning(
                "Reporting the status of pod %s failed (attempt %d of %d): %s",
                self.label,
                attempt + 1,
                attempts,
                failure,
            )
            if attempt + 1 < attempts:
                time.sleep(min(2.0**attempt, 10.0))
