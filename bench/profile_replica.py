"""Where one request's CPU time goes inside the serving replica, under load.

Starts one ``bench.run_all`` Serve variant (default ``ray-haproxy-1replica``: one replica, so one
process holds all the request path), drives it with ``bench.loadgen`` at fixed concurrency, and
samples the replica with ``py-spy record --format raw`` (PyPI ``py-spy``, in ``.[bench]``) for the
measured window. Each sample is charged to the first frame, from the innermost outwards, that
belongs to a known owner (so numpy called by our code counts as ours, protobuf parsing called
by Ray's gRPC servicer as protobuf):

    TensorFlow (the model call)  | ours (ray_app: parsing, checks, batching glue, answers)
    protobuf (message (de)serialisation) | Serve's @serve.batch | Ray Serve's request path
    Ray core (metrics, logging, actor plumbing) | gRPC (grpc.aio) | asyncio/uvloop | other

By default py-spy samples Python frames only, without pausing the replica: time inside a C
extension is charged to the Python frame that called it, which is what the owners above are
about; a thread with no Python frame above its entry point runs C code (Ray runs each actor's
asyncio loop, uvloop, in such a thread). ``--native`` adds C/C++ frames but must pause the
replica for every sample (a fraction of the throughput): use it to look inside, not to measure. Idle threads are left out,
so the shares are of the time the replica was busy; with the replica's CPU seconds per request
from /proc they give milliseconds per request by owner.

    .venv/bin/python -m bench.profile_replica --out bench/results/profile-replica.json
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.loadgen import run_load
from bench.processes import cpu_s, replica_pids
from bench.run_all import parse_args
from bench.servers import serve_app
from bench.variants import VARIANTS

# (owner, substrings of a frame's "function (file:line)" text); the first owner found from the
# innermost frame outwards takes the sample. Order matters where paths nest (serve/batching.py
# before serve/, ray/serve before ray/).
OWNERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("TensorFlow (model call)", ("/tensorflow/", "/keras/", "/tf_keras/")),
    ("ours (ray_app)", ("/ray_app/",)),
    ("protobuf", ("/google/protobuf/",)),
    ("Serve @serve.batch", ("/ray/serve/batching.py",)),
    ("Ray Serve request path", ("/ray/serve/",)),
    ("Ray core", ("/ray/",)),
    ("gRPC (grpc.aio)", ("/grpc/", "grpc/_cython")),
    ("asyncio / uvloop", ("/asyncio/", "/uvloop/")),
)


# A thread whose innermost Python frame is its entry point is running C code with no Python
# frame above it. Seen with --native: Ray runs each actor's asyncio loop in such a thread
# (uvloop's ``uv_run``: I/O polling and the C-level callbacks of gRPC's Cython layer), and an
# idle ThreadPoolExecutor worker blocks in ``SimpleQueue.get`` (py-spy does not flag that idle).
NATIVE_LOOP = "event loop in C (uvloop, gRPC's Cython)"
IDLE = "idle thread-pool workers"


def owner_of(stack: str) -> str:
    """The owner of one raw py-spy stack (frames root first, separated by ';')."""
    frames = stack.split(";")
    for frame in reversed(frames):
        for owner, markers in OWNERS:
            if any(marker in frame for marker in markers):
                return owner
    innermost = frames[-1]
    if innermost.startswith("_worker (") and "/concurrent/futures/thread.py:" in innermost:
        return IDLE
    if innermost.startswith("Thread.run (") and "/threading.py:" in innermost:
        return NATIVE_LOOP
    return "other"


def shares(raw: str) -> tuple[dict[str, int], int]:
    """Samples by owner from py-spy's raw (collapsed-stack) output, and the busy total (idle
    thread-pool workers are counted but not part of the total)."""
    counts: collections.Counter[str] = collections.Counter()
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            counts[owner_of(stack)] += int(count)
    return dict(counts.most_common()), sum(n for owner, n in counts.items() if owner != IDLE)


def _record(pid: int, duration_s: float, rate: int, out: Path, native: bool) -> subprocess.Popen[bytes]:
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    cmd = [py_spy, "record", "--pid", str(pid), "--duration", str(int(duration_s)), "--rate", str(rate)]
    # --native must pause the process for each sample (py-spy refuses --nonblocking with it)
    cmd += ["--native"] if native else ["--nonblocking"]
    return subprocess.Popen(
        [*cmd, "--format", "raw", "--full-filenames", "--output", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def profile(args: argparse.Namespace) -> dict[str, Any]:
    variant = VARIANTS[args.variant]
    workdir = Path(tempfile.mkdtemp(prefix="profile-"))
    with serve_app(variant, args, workdir) as running:
        pids = replica_pids(running.sid)
        if not pids:
            raise RuntimeError("no ServeReplica process found in the server's session")
        # Warm up (the first batches trace TF functions), then load and record together.
        asyncio.run(
            run_load(
                running.target,
                args.model_name,
                args.concurrency,
                3.0,
                args.images,
                warmup_s=1.0,
                token=running.token,
            )
        )
        load: dict[str, Any] = {}
        thread = threading.Thread(
            target=lambda: load.update(
                asyncio.run(
                    run_load(
                        running.target,
                        args.model_name,
                        args.concurrency,
                        args.duration_s,
                        args.images,
                        warmup_s=1.0,
                        token=running.token,
                    )
                )
            )
        )
        thread.start()
        time.sleep(1.0)  # the load's own warm-up: CPU and samples count from its end
        cpu_before = {pid: cpu_s(pid) for pid in pids}
        outputs = {pid: workdir / f"replica-{pid}.txt" for pid in pids}
        recorders = [
            _record(pid, args.duration_s - 0.5, args.rate, outputs[pid], args.native) for pid in pids
        ]
        failures = []
        try:
            for recorder in recorders:
                try:
                    _, err = recorder.communicate(timeout=args.duration_s + 60)
                except subprocess.TimeoutExpired:
                    recorder.kill()
                    _, err = recorder.communicate()
                if recorder.returncode != 0:
                    failures.append(err.decode(errors="replace")[-2000:])
        finally:
            for recorder in recorders:  # none outlives this run
                if recorder.poll() is None:
                    recorder.kill()
                    recorder.wait()
            thread.join()
        busy_s = sum(cpu_s(pid) - cpu_before[pid] for pid in pids)
    if failures:
        raise RuntimeError(f"py-spy failed: {failures[0]}")
    if "requests_ok" not in load:
        raise RuntimeError("the load generator did not finish (see the messages above)")
    counts, total = shares("\n".join(path.read_text() for path in outputs.values()))
    requests = load["requests_ok"]
    cpu_ms_per_request = 1000.0 * busy_s / max(requests, 1)
    rows = [
        {
            "owner": owner,
            "samples": n,
            "share": round(n / total, 3),
            "cpu_ms_per_request": round(cpu_ms_per_request * n / total, 3),
        }
        for owner, n in counts.items()
        if owner != IDLE
    ]
    return {
        "variant": variant.name,
        "concurrency": args.concurrency,
        "images_per_request": args.images,
        "duration_s": args.duration_s,
        "replicas": len(pids),
        "load": {k: load.get(k) for k in ("img_per_s", "req_per_s", "p50_ms", "p99_ms", "errors")},
        "replica_cpu_ms_per_request": round(cpu_ms_per_request, 3),
        "samples": total,
        "idle_thread_pool_samples": counts.get(IDLE, 0),
        "owners": rows,
    }


def _table(report: dict[str, Any]) -> str:
    lines = [
        f"{report['variant']}, c = {report['concurrency']}, {report['images_per_request']} image(s) per request: "
        f"{report['load']['req_per_s']:.0f} req/s, replica CPU {report['replica_cpu_ms_per_request']:.2f} ms "
        f"per request ({report['samples']} samples)",
        "",
        "| owner | share of busy samples | CPU ms per request |",
        "|---|---|---|",
    ]
    for row in report["owners"]:
        lines.append(f"| {row['owner']} | {row['share']:.1%} | {row['cpu_ms_per_request']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument(
        "--variant", default="ray-haproxy-1replica", choices=[n for n in VARIANTS if n.startswith("ray")]
    )
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--images", type=int, default=1, help="images per request")
    parser.add_argument("--duration-s", type=float, default=15.0)
    parser.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    parser.add_argument("--native", action="store_true", help="also sample C/C++ frames (slower to record)")
    args, rest = parser.parse_known_args(argv)
    # The server settings (model, timeouts, logs) are run_all's, with its defaults.
    server_args = parse_args(["--out", str(args.out), *rest])
    for name in ("variant", "concurrency", "images", "duration_s", "rate", "native"):
        setattr(server_args, name, getattr(args, name))
    report = profile(server_args)
    report["table"] = _table(report)
    print(report["table"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
