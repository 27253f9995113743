"""A replica SIGKILLed under gRPC load, and which failed requests that may excuse.

Shared by tests/integration/test_faults.py (clients on the front door) and test_edge.py (clients
through the TLS edge). Clients ask in a loop; one replica is killed; a failed request is excused
only when it was on the victim: not answered before the kill, and sent before HAProxy could know
the replica was gone. HAProxy learns that when it sees the replica's connection close, which shows
as the moment it fails the requests that were in flight on it (on a loaded 2-core machine, up to
~150 ms after SIGKILL); a request it wrote to a connection to the victim before then met a dead
replica, as one in flight did. That moment, plus ``NOTICE_S``, ends the window; every request sent
after it must succeed, and HAProxy must notice within ``NOTICED_WITHIN_S``.
"""

from __future__ import annotations

import collections
import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import grpc
import psutil
import pytest
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from tests.integration.cluster import cluster_processes
from tests.polling import wait_for

REPLICA_CLASS = "ServeReplica:mnist:MnistServer"
NOTICE_S = 0.1  # slack after the process exit or the in-flight failures, whichever is later
NOTICED_WITHIN_S = 5.0


@dataclass(frozen=True)
class Outcome:
    started_s: float
    ended_s: float
    code: str


@dataclass(frozen=True)
class KillRun:
    """What the clients saw around one replica kill (monotonic seconds)."""

    killed_s: float
    gone_s: float  # the victim's process had exited: its sockets are closed
    replaced_s: float
    outcomes: list[Outcome] = field(repr=False)

    @property
    def noticed_s(self) -> float:
        """When HAProxy could know the victim was gone: its exit, or the in-flight failures."""
        return max([self.gone_s] + [o.ended_s for o in self.in_flight_at_kill]) + NOTICE_S

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.code != "OK"]

    @property
    def on_victim(self) -> list[Outcome]:
        """Failures the kill excuses: unanswered at the kill, sent before HAProxy could notice."""
        noticed_s = self.noticed_s
        return [o for o in self.failed if o.started_s <= noticed_s and o.ended_s >= self.killed_s]

    @property
    def unexcused(self) -> list[Outcome]:
        excused = self.on_victim
        return [o for o in self.failed if o not in excused]

    @property
    def after(self) -> list[Outcome]:
        """Requests sent once the victim was gone and HAProxy could know it."""
        noticed_s = self.noticed_s
        return [o for o in self.outcomes if o.started_s > noticed_s]

    @property
    def in_flight_at_kill(self) -> list[Outcome]:
        """Failures sent before the kill and answered after it."""
        return [o for o in self.failed if o.started_s <= self.killed_s <= o.ended_s]

    def summary(self) -> str:
        codes = dict(collections.Counter(o.code for o in self.failed))
        return (
            f"{len(self.outcomes)} requests, {len(self.after)} after the replica was gone "
            f"(exited {(self.gone_s - self.killed_s) * 1000:.0f} ms and noticed "
            f"{(self.noticed_s - NOTICE_S - self.killed_s) * 1000:.0f} ms after SIGKILL), failed by code {codes}; "
            f"replaced after {self.replaced_s - self.killed_s:.1f} s"
        )


def replica_pids() -> set[int]:
    """Process ids of the app's live replicas in this test's cluster (by their Ray process title)."""
    import ray

    pids = set()
    for process in cluster_processes(ray.get_runtime_context().get_node_id()):
        with contextlib.suppress(psutil.NoSuchProcess):
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                title = process.cmdline()
                if title and title[0].startswith("ray::" + REPLICA_CLASS):
                    pids.add(process.pid)
    return pids


def exited_s(pid: int, timeout_s: float = 10.0) -> float:
    """The monotonic time at which process ``pid`` has exited (a zombie or reaped), polled every ms."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return time.monotonic()
        except psutil.NoSuchProcess:
            return time.monotonic()
        time.sleep(0.001)
    pytest.fail(f"process {pid} still running {timeout_s} s after SIGKILL")


def kill_a_replica_under_load(
    open_channel: Callable[[], grpc.Channel],
    request: predict_pb2.PredictRequest,
    clients: int,
    warm_s: float = 3.0,
    replacement_timeout_s: float = 120.0,
    metadata: Sequence[tuple[str, str]] | None = None,
) -> KillRun:
    """``clients`` threads call Predict over their own channel (with ``metadata``, e.g. a token);
    the lowest-pid replica is SIGKILLed after ``warm_s``; traffic goes on until Serve has replaced
    it and for ``warm_s`` more."""
    wait_for(lambda: len(replica_pids()) == 2, replacement_timeout_s, "two replicas running")
    outcomes: list[Outcome] = []
    stop = threading.Event()

    def client() -> None:
        with open_channel() as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            while not stop.is_set():
                started_s = time.monotonic()
                try:
                    stub.Predict(request, timeout=30, metadata=metadata)
                    code = "OK"
                except grpc.RpcError as exc:
                    code = exc.code().name
                outcomes.append(Outcome(started_s, time.monotonic(), code))

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(warm_s)  # both replicas take traffic
        victim = min(replica_pids())
        killed_s = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        gone_s = exited_s(victim)
        wait_for(
            lambda: len(replica_pids()) == 2 and victim not in replica_pids(),
            replacement_timeout_s,
            "Serve to replace the killed replica",
        )
        replaced_s = time.monotonic()
        time.sleep(warm_s)  # traffic over the replacement too
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
    return KillRun(killed_s, gone_s, replaced_s, list(outcomes))


def assert_only_the_victims_requests_failed(run: KillRun, clients: int) -> None:
    assert not run.unexcused, f"requests that were not on the killed replica failed: {run.unexcused[:5]}"
    # a client has one request at a time: at most one per client was in flight at the kill
    assert len(run.in_flight_at_kill) <= clients
    assert run.noticed_s - run.killed_s < NOTICED_WITHIN_S, run.summary()
    assert len(run.after) > 50 and all(o.code == "OK" for o in run.after)
