"""The edge's configuration (ray_app.edge): validation, rendering checked by HAProxy itself, the CLI's
pid-file handling, and the cluster's files that use it. No Ray; HAProxy only as its config checker."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from ray_app.edge import config as edge_config
from ray_app.edge.config import EdgeConfig
from ray_app.edge.haproxy_config import EdgeFiles, combined_pem, render
from ray_app.edge.supervisor import EdgeError, EdgeProcess, haproxy_binary
from tests.certs import CertificateAuthority

REPO = Path(__file__).resolve().parents[2]
EDGE_CONFIGS = sorted((REPO / "serve_configs" / "edge").glob("*.yaml"))
UPSTREAM = {"grpc_port": 9001, "http_port": 8001}


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    directory = tmp_path_factory.mktemp("pki")
    ca = CertificateAuthority(directory)
    return ca, ca.issue("server", server=True)


def _haproxy_accepts(text: str, tmp_path: Path) -> subprocess.CompletedProcess:
    path = tmp_path / "check.cfg"
    path.write_text(text)
    return subprocess.run(
        [haproxy_binary(), "-c", "-f", str(path)], capture_output=True, text=True, timeout=30
    )


@pytest.mark.parametrize("mode", ["plaintext", "tls", "mutual-tls"])
def test_every_mode_renders_a_config_haproxy_accepts(mode, pki, tmp_path) -> None:
    ca, server = pki
    tls = None
    if mode != "plaintext":
        tls = {"server_cert": server.cert, "server_key": server.key}
    if mode == "mutual-tls":
        tls |= {"custom_ca": ca.cert, "client_verify": True}
    config = EdgeConfig(upstream=UPSTREAM, tls=tls)
    files = EdgeFiles(tmp_path)
    files.server_pem.write_bytes(combined_pem(server.cert.read_bytes(), server.key.read_bytes()))
    result = _haproxy_accepts(render(config, files), tmp_path)
    assert result.returncode == 0, result.stderr


def test_client_verify_needs_a_ca() -> None:
    with pytest.raises(ValidationError, match="client_verify needs custom_ca"):
        EdgeConfig(
            upstream=UPSTREAM, tls={"server_cert": "a.crt", "server_key": "a.key", "client_verify": True}
        )


def test_unknown_settings_and_one_port_for_both_are_refused() -> None:
    with pytest.raises(ValidationError):
        EdgeConfig(upstream=UPSTREAM, ssl=True)
    with pytest.raises(ValidationError, match="must differ"):
        EdgeConfig(upstream=UPSTREAM, grpc_port=9000, http_port=9000)


def test_combined_pem_keeps_both_parts_whole() -> None:
    assert combined_pem(b"CERT", b"KEY\n") == b"CERT\nKEY\n"


def test_relative_certificate_paths_are_relative_to_the_config_file(tmp_path) -> None:
    (tmp_path / "conf").mkdir()
    path = tmp_path / "conf" / "edge.yaml"
    path.write_text(
        yaml.safe_dump({"upstream": UPSTREAM, "tls": {"server_cert": "s.crt", "server_key": "/k/s.key"}})
    )
    tls = edge_config.load(path).tls
    assert tls.server_cert == tmp_path / "conf" / "s.crt" and tls.server_key == Path("/k/s.key")


def test_a_config_haproxy_refuses_is_never_written(pki, tmp_path) -> None:
    ca, server = pki
    config = EdgeConfig(upstream={**UPSTREAM, "host": "no such host!"})
    with pytest.raises(EdgeError, match="HAProxy refuses"):
        EdgeProcess(config, tmp_path / "state").write_files()
    assert not (tmp_path / "state" / "haproxy.cfg").exists()


def test_a_key_that_does_not_match_leaves_the_files_in_use_alone(pki, tmp_path) -> None:
    ca, server = pki
    other = ca.issue("other", server=True)
    config = EdgeConfig(upstream=UPSTREAM, tls={"server_cert": server.cert, "server_key": server.key})
    EdgeProcess(config, tmp_path / "state").write_files()
    in_use = (tmp_path / "state" / "server.pem").read_bytes()
    mismatched = config.model_copy(
        update={"tls": config.tls.model_copy(update={"server_key": other.key})}
    )  # e.g. a rotation caught half-way: new key, old certificate
    with pytest.raises(EdgeError, match="HAProxy refuses"):
        EdgeProcess(mismatched, tmp_path / "state").write_files()
    assert (tmp_path / "state" / "server.pem").read_bytes() == in_use


def test_missing_certificate_files_are_an_edge_error(tmp_path) -> None:
    config = EdgeConfig(
        upstream=UPSTREAM, tls={"server_cert": tmp_path / "none.crt", "server_key": tmp_path / "k"}
    )
    with pytest.raises(EdgeError, match="cannot read the server certificate"):
        EdgeProcess(config, tmp_path / "state").write_files()


def test_key_material_is_readable_by_its_owner_only(pki, tmp_path) -> None:
    _, server = pki
    config = EdgeConfig(upstream=UPSTREAM, tls={"server_cert": server.cert, "server_key": server.key})
    edge = EdgeProcess(config, tmp_path / "state")
    edge.write_files()
    assert edge.files.server_pem.stat().st_mode & 0o077 == 0
    assert edge.files.state_dir.stat().st_mode & 0o077 == 0


def test_stop_with_a_stale_pid_file_leaves_other_processes_alone(tmp_path) -> None:
    bystander = subprocess.Popen(["sleep", "30"])
    try:
        pid_file = tmp_path / "edge.pid"
        pid_file.write_text(f"{bystander.pid}\n")  # a pid now used by something that is no edge
        result = subprocess.run(
            [sys.executable, "-m", "ray_app.edge", "stop", "--pid-file", str(pid_file)],
            capture_output=True, text=True, timeout=60, cwd=REPO,
        )  # fmt: skip
        assert result.returncode == 0 and "not running" in result.stderr
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


@pytest.mark.parametrize("path", EDGE_CONFIGS, ids=lambda p: p.name)
def test_shipped_edge_configs_render_configs_haproxy_accepts(path, tmp_path) -> None:
    config = edge_config.load(path)
    if config.tls is not None:  # the real certificates live on the nodes: stand-ins of our own
        ca = CertificateAuthority(tmp_path)
        server = ca.issue("server", server=True)
        config = config.model_copy(
            update={
                "tls": config.tls.model_copy(
                    update={"server_cert": server.cert, "server_key": server.key, "custom_ca": ca.cert}
                )
            }  # fmt: skip
        )
    files = EdgeFiles(tmp_path)
    if config.tls is not None:
        files.server_pem.write_bytes(
            combined_pem(config.tls.server_cert.read_bytes(), config.tls.server_key.read_bytes())
        )
    result = _haproxy_accepts(render(config, files), tmp_path)
    assert result.returncode == 0, result.stderr


def test_cluster_edge_forwards_to_the_ports_gpu_yaml_gives_serve() -> None:
    """Every node's edge owns the public ports and forwards to Ray's HAProxy on gpu.yaml's ports."""
    cluster = yaml.safe_load((REPO / "cluster.yaml").read_text())
    gpu = yaml.safe_load((REPO / "serve_configs" / "gpu.yaml").read_text())
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        words = [w for command in cluster[key] for w in shlex.split(command, comments=True)]
        assert "ray_app.edge" in words, f"{key} does not start the edge"
        config_arg = words[words.index("--config", words.index("ray_app.edge")) + 1]
        config = edge_config.load(REPO / os.path.relpath(config_arg.replace("~/mnist-ray/", ""), "."))
        assert config.tls is not None, f"{key}: the cluster's edge must use TLS"
        assert (config.upstream.grpc_port, config.upstream.http_port) == (
            gpu["grpc_options"]["port"],
            gpu["http_options"]["port"],
        )
        assert {config.grpc_port, config.http_port}.isdisjoint(
            {config.upstream.grpc_port, config.upstream.http_port}
        )
