"""The front door's environment (ray_app/front_door.py) and every place that starts Ray with it."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from client.pipeline import Journey, PipelineConfig
from ray_app.front_door import (
    GRPC_MAX_MESSAGE_BYTES,
    HAPROXY_SWITCH,
    SIDE_PORT_VARIABLES,
    fallback_ports,
    front_door_env,
    node_cpus,
    private_state_dir,
)
from tests import doc_blocks

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("cpus", "threads", "maxconn"), [(2, 1, 2048), (4, 1, 4096), (8, 2, 8192), (64, 4, 16384)]
)
def test_haproxy_is_sized_for_the_node(cpus: int, threads: int, maxconn: int) -> None:
    env = front_door_env(cpus, environ={})
    assert env["RAY_SERVE_HAPROXY_NBTHREAD"] == str(threads) and env["RAY_SERVE_HAPROXY_MAXCONN"] == str(
        maxconn
    )


def test_haproxy_and_direct_ingress_are_the_default() -> None:
    env = front_door_env(2, environ={})
    assert env[HAPROXY_SWITCH] == "1" and env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"
    assert env["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] == "5"  # one machine
    assert (
        front_door_env(8, cluster=True, environ={})["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] == "30"
    )
    assert 8500 not in fallback_ports(env)  # TF Serving's own gRPC port stays free
    assert int(env["RAY_SERVE_HAPROXY_TIMEOUT_SERVER_S"]) > 30  # above the configs' request_timeout_s
    assert (
        30 < int(env["RAY_SERVE_HAPROXY_HARD_STOP_AFTER_S"]) < 120
    )  # requests finish; ports free sooner than Ray's
    # Serve's gRPC servers take the largest request our configs allow, and not 2 GiB
    largest = max(
        yaml.safe_load((REPO / "serve_configs" / name).read_text())["applications"][0]["args"]["limits"][
            "max_request_bytes"
        ]
        for name in ("local.yaml", "gpu.yaml")
    )
    assert largest < GRPC_MAX_MESSAGE_BYTES == int(env["RAY_SERVE_GRPC_MAX_MESSAGE_SIZE"]) < 2**31 - 1


def test_haproxy_never_replays_a_request_a_replica_may_have_died_of() -> None:
    """Connection failures only (nothing reached a replica): not ``empty-response``, which would
    replay a request that killed its replica (out of memory) onto the next one (docs/limits.md)."""
    for env in (front_door_env(2, environ={}), front_door_env(8, cluster=True, environ={})):
        assert env["RAY_SERVE_HAPROXY_RETRY_ON"] == "conn-failure"


def test_one_switch_back_to_the_python_proxy() -> None:
    env = front_door_env(2, environ={HAPROXY_SWITCH: "0"})
    assert env[HAPROXY_SWITCH] == "0" and "RAY_SERVE_THROUGHPUT_OPTIMIZED" not in env
    assert fallback_ports(env) == ()


def test_the_shell_form_prints_the_same_environment() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ray_app.front_door", "--cpus", "8", "--cluster"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr
    printed = dict(shlex.split(line)[1].split("=", 1) for line in result.stdout.splitlines())
    assert printed == front_door_env(8, cluster=True, environ={}, state_dir=private_state_dir())


def test_every_place_that_starts_ray_uses_it(tmp_path) -> None:
    cluster = yaml.safe_load((REPO / "cluster.yaml").read_text())
    for role in ("head", "worker"):
        (start,) = [c for c in cluster[f"{role}_start_ray_commands"] if "ray start" in c]
        assert start.index('eval "$(python -m ray_app.front_door --cluster)";') < start.index("ray start")
    ((_, block),) = doc_blocks.blocks("pipeline-steps")  # the tutorial's step-by-step block
    assert 'eval "$(python -m ray_app.front_door)"' in block.split("ray start")[0]
    # the README's main command: the environment it gives `ray start` is the front door's
    journey = Journey(PipelineConfig(run_dir=tmp_path))
    given = journey.set_front_door()
    try:
        expected = front_door_env(node_cpus(), state_dir=journey.haproxy_state_dir)
        moved = {v for v in SIDE_PORT_VARIABLES if given.get(v) != expected.get(v)}  # only ports in use move
        assert {k: v for k, v in given.items() if k not in moved} == {
            k: v for k, v in expected.items() if k not in moved
        }
        assert {k: v for k, v in journey.env.items() if k in given} == given
    finally:
        shutil.rmtree(journey.haproxy_state_dir, ignore_errors=True)


def test_haproxys_admin_socket_goes_into_a_directory_only_its_user_can_enter(tmp_path, capsys) -> None:
    """Ray renders the admin socket mode 666; the 0700 directory keeps other users out of it."""
    import os

    path = private_state_dir(root=str(tmp_path))
    assert os.stat(path).st_mode & 0o777 == 0o700
    assert private_state_dir(root=str(tmp_path)) == path  # the same one next time
    os.chmod(path, 0o755)
    with pytest.raises(RuntimeError, match="mode 0700"):
        private_state_dir(root=str(tmp_path))


def test_the_printed_front_door_puts_haproxys_sockets_in_the_private_directory(capsys, monkeypatch) -> None:
    import os

    from ray_app import front_door

    monkeypatch.delenv("RAY_SERVE_ENABLE_HA_PROXY", raising=False)
    front_door.main(["--cpus", "2"])
    exports = dict(
        line.removeprefix("export ").split("=", 1) for line in capsys.readouterr().out.splitlines()
    )
    socket_dir = os.path.dirname(exports["RAY_SERVE_HAPROXY_SOCKET_PATH"])
    assert socket_dir == front_door.private_state_dir()
    assert os.stat(socket_dir).st_mode & 0o077 == 0


def test_the_front_door_can_name_another_machines_state_directory(capsys, monkeypatch) -> None:
    """``--state-dir`` (KubeRay's ConfigMap, generated away from the pods): that directory, used
    as given, and this machine's private one is neither made nor checked."""
    from ray_app import front_door

    monkeypatch.delenv("RAY_SERVE_ENABLE_HA_PROXY", raising=False)
    monkeypatch.setattr(front_door, "private_state_dir", lambda: pytest.fail("made this machine's directory"))
    front_door.main(["--cpus", "3", "--cluster", "--state-dir", "/var/lib/mnist-ha"])
    exports = dict(
        line.removeprefix("export ").split("=", 1) for line in capsys.readouterr().out.splitlines()
    )
    assert exports == front_door.front_door_env(3, cluster=True, state_dir="/var/lib/mnist-ha", environ={})
