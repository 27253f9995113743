"""How clients reach the app: HAProxy + direct ingress (the default) or Serve's Python proxy.

Ray 2.60 switches its front door with environment variables that every Serve process (controller,
HAProxy manager, replicas, the fallback proxy) reads once, when it first imports Serve. So they
belong in the environment of whatever starts Ray: ``ray start`` (the local journey,
``cluster.yaml``), or the process that calls ``ray.init()`` / ``serve run -a local`` (tests,
benchmarks). A Serve config cannot set them. :func:`front_door_env` is the one place that says
which, and ``python -m ray_app.front_door`` prints them as ``export`` lines for a shell.

HAProxy (bundled with ``ray[serve]``) takes the Serve ports (gRPC 9000, HTTP 8000) and balances,
least-connections and health-checked, to each replica's own gRPC/HTTP servers: no Python proxy,
no actor call, no pickling per request. Stock TF Serving clients see nothing Ray-specific.

``RAY_SERVE_ENABLE_HA_PROXY=0`` in that environment is the one switch back to Serve's Python
proxy (every request through a proxy actor): the fallback when HAProxy is not wanted.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import stat
import sys
from collections.abc import Mapping

HAPROXY_SWITCH = "RAY_SERVE_ENABLE_HA_PROXY"

# Each value below, and why (docs/reference/front-door.md):
#   THROUGHPUT_OPTIMIZED    replica runs user code and the direct-ingress servers on one event loop,
#                           buffers its logs, no per-request stderr line: less CPU per request. Our
#                           replica keeps slow work off its loop (model calls, image decoding and
#                           file-system reads run in threads; a REST JSON body, bounded by
#                           max_request_bytes, is parsed on it).
#   NBTHREAD                one HAProxy thread per 4 CPUs (1 to 4): a thread relays tens of thousands
#                           of requests/s; more threads only compete with the replicas for cores.
#   MAXCONN                 concurrent client connections: 1024 per CPU, 2048 to 16384 (~32 KiB each).
#   TIMEOUT_CONNECT_S       replicas are on the cluster network: 2 s without a TCP connect means a dead
#                           replica, and HAProxy retries the request on another one (retry-on conn-failure).
#   RETRY_ON, RETRIES       connection failures only (nothing reached a replica), as Ray's default. Not
#                           `empty-response`: a replica that closed the connection unanswered may have died
#                           of the request itself (out of memory on a hostile body), and a replay would take
#                           the next replica down the same way. So a request in flight on a crashed replica
#                           fails (HTTP 502/503, gRPC UNAVAILABLE) and its client retries; idempotent as our
#                           calls are, the client decides. At most 2 retries of an unreached replica.
#   TIMEOUT_CLIENT_S        an idle client connection is closed after 10 min (gRPC channels reconnect).
#   TIMEOUT_SERVER_S        60 s: above Serve's request_timeout_s (30 s in our configs), which answers a
#                           slow request properly first; this only cuts a replica that stopped answering.
#   HARD_STOP_AFTER_S       a stopping HAProxy (a reload's old worker, or one left by `serve shutdown` and
#                           `ray stop`) lets requests in flight finish, then exits: 45 s, above the configs'
#                           request_timeout_s (30 s), instead of Ray's 120 s, so the ports are free soon.
#   MIN_DRAINING_PERIOD_S   how long a stopping replica keeps answering while HAProxy moves off it: 5 s
#                           on one machine (HAProxy reloads within 0.1 s there), Ray's 30 s on a cluster.
#   FALLBACK_PROXY_*_PORT   HAProxy mode always starts a Python proxy as a backup; Ray puts it on
#                           8500/9500, and 8500 is TF Serving's own gRPC port: moved to 18000/19000.
#   GRPC_MAX_MESSAGE_SIZE   Serve's gRPC servers accept 2 GiB by default; 17 MiB covers the largest
#                           max_request_bytes in our configs (16 MiB) plus the protobuf envelope, so a
#                           larger message is refused by gRPC before it is read in full.
HAPROXY_HARD_STOP_AFTER_S = 45
_FALLBACK_HTTP_PORT = 18000
_FALLBACK_GRPC_PORT = 19000
GRPC_MAX_MESSAGE_BYTES = 17 * 1024 * 1024


def haproxy_threads(cpus: float) -> int:
    return max(1, min(4, int(cpus) // 4))


def haproxy_maxconn(cpus: float) -> int:
    return max(2048, min(16384, 1024 * int(cpus)))


def front_door_env(
    cpus: float,
    *,
    cluster: bool = False,
    state_dir: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The environment of ``ray start`` (or ``ray.init``) for this app's front door, on a node of ``cpus``.

    ``cluster``: Ray's default 30 s drain instead of 5 s. ``state_dir``: where HAProxy keeps its
    config, sockets and state (per run, so a run can find and stop its own haproxy processes;
    Ray's default is the shared ``/tmp/haproxy-serve``). ``environ`` (default ``os.environ``)
    decides the mode: ``RAY_SERVE_ENABLE_HA_PROXY=0`` there selects Serve's Python proxy.
    """
    environ = os.environ if environ is None else environ
    if environ.get(HAPROXY_SWITCH) == "0":
        return {HAPROXY_SWITCH: "0", "RAY_SERVE_GRPC_MAX_MESSAGE_SIZE": str(GRPC_MAX_MESSAGE_BYTES)}
    env = {
        HAPROXY_SWITCH: "1",
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
        "RAY_SERVE_HAPROXY_NBTHREAD": str(haproxy_threads(cpus)),
        "RAY_SERVE_HAPROXY_MAXCONN": str(haproxy_maxconn(cpus)),
        "RAY_SERVE_HAPROXY_TIMEOUT_CONNECT_S": "2",
        "RAY_SERVE_HAPROXY_RETRY_ON": "conn-failure",
        "RAY_SERVE_HAPROXY_RETRIES": "2",
        "RAY_SERVE_HAPROXY_TIMEOUT_CLIENT_S": "600",
        "RAY_SERVE_HAPROXY_TIMEOUT_SERVER_S": "60",
        "RAY_SERVE_HAPROXY_HARD_STOP_AFTER_S": str(HAPROXY_HARD_STOP_AFTER_S),
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "30" if cluster else "5",
        "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(_FALLBACK_HTTP_PORT),
        "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT": str(_FALLBACK_GRPC_PORT),
        "RAY_SERVE_GRPC_MAX_MESSAGE_SIZE": str(GRPC_MAX_MESSAGE_BYTES),
    }
    if state_dir:
        env.update(
            RAY_SERVE_HAPROXY_CONFIG_FILE_LOC=os.path.join(state_dir, "haproxy.cfg"),
            RAY_SERVE_HAPROXY_SOCKET_PATH=os.path.join(state_dir, "admin.sock"),
            RAY_SERVE_HAPROXY_SERVER_STATE_BASE=state_dir,
            RAY_SERVE_HAPROXY_SERVER_STATE_FILE=os.path.join(state_dir, "server-state"),
            RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH=os.path.join(state_dir, "metrics.sock"),
        )
    return env


# HAProxy's state directory in the cluster image, made mode 0700 by .ci/docker/Dockerfile: KubeRay
# starts Ray itself (no `eval` of our lines first), so its ConfigMap names this one.
IMAGE_STATE_DIR = "/var/lib/mnist-ha"


def private_state_dir(uid: int | None = None, root: str = "/tmp") -> str:
    """This user's HAProxy state directory, ``/tmp/mnist-ha-<uid>``, mode 0700: Ray renders the
    admin socket in it ``mode 666 level admin`` (haproxy_templates.py, no switch), so the
    directory is what keeps other users from reaching it. Refuses one that another user owns or
    that others can enter (docs/security.md)."""
    uid = os.getuid() if uid is None else uid
    path = os.path.join(root, f"mnist-ha-{uid}")
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != uid or info.st_mode & 0o077:
        raise RuntimeError(
            f"{path} must be a directory of user {uid} with mode 0700 (it holds HAProxy's admin socket)"
        )
    return path


def fallback_ports(env: Mapping[str, str]) -> tuple[int, ...]:
    """Ports the fallback Python proxy binds in HAProxy mode (none in Python-proxy mode)."""
    if env.get(HAPROXY_SWITCH) != "1":
        return ()
    return int(env["RAY_SERVE_FALLBACK_PROXY_HTTP_PORT"]), int(env["RAY_SERVE_FALLBACK_PROXY_GRPC_PORT"])


# Ports HAProxy mode binds besides the serving ports (Ray's fixed defaults, or ours above).
SIDE_PORT_VARIABLES = (
    "RAY_SERVE_HAPROXY_STATS_PORT",
    "RAY_SERVE_HAPROXY_METRICS_PORT",
    "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT",
    "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT",
)


def node_cpus() -> float:
    """CPUs as Ray counts them for this node (it honours cgroup quotas; os.cpu_count() does not)."""
    try:
        from ray._private.utils import get_num_cpus  # private, but pinned with Ray 2.60

        return float(get_num_cpus())
    except (ImportError, AttributeError):
        return float(os.cpu_count() or 1)


def main(argv: list[str] | None = None) -> int:
    """Print the front door's environment as ``export`` lines (``eval "$(python -m ray_app.front_door)"``)."""
    parser = argparse.ArgumentParser(prog="python -m ray_app.front_door", description=main.__doc__)
    parser.add_argument("--cpus", type=float, default=None, help="the node's CPUs (default: this machine's)")
    parser.add_argument("--cluster", action="store_true", help="Ray's 30 s drain (multi-node clusters)")
    parser.add_argument(
        "--state-dir",
        default=None,
        help="HAProxy's state directory on the nodes that will use these lines, made there beforehand "
        f"with mode 0700 (the image's {IMAGE_STATE_DIR}, for KubeRay's ConfigMap); default: this "
        "user's private directory on this machine, made and checked now",
    )
    args = parser.parse_args(argv)
    cpus = args.cpus if args.cpus is not None else node_cpus()
    state_dir = args.state_dir or private_state_dir()  # --state-dir: another machine's, not checked here
    env = front_door_env(cpus, cluster=args.cluster, state_dir=state_dir)
    for name, value in env.items():
        print(f"export {name}={shlex.quote(value)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
