"""The edge (ray_app/edge) in front of the app's front door, for real: slow clients, TLS, mutual TLS,
certificate rotation, a version rollout and a replica kill through it.

One local Ray serves serve_configs/local.yaml's deployment (2 replicas) for the module, with bearer
tokens on (as gpu.yaml has them): every client here sends one, so the front door's guarantees are
shown with TLS and tokens on together. Each test starts the edges it needs (HAProxy, ~0.1 s) on
free ports and checks they are gone afterwards.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import ssl
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import psutil
import pytest
import requests
import yaml
from tensorflow_serving.apis import (
    get_model_status_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from bench.slow_clients import SlowAttack, Target, normal_client
from client.local import leftovers
from client.local.ports import free_port, port_in_use
from ray_app.edge.config import EdgeConfig
from ray_app.edge.supervisor import EdgeProcess
from ray_app.protocol.tensors import from_ndarray
from tests.certs import CertificateAuthority
from tests.conftest import publish_copy
from tests.integration.cluster import local_serve, run_local_app
from tests.integration.replica_kill import (
    assert_only_the_victims_requests_failed,
    kill_a_replica_under_load,
)
from tests.integration.sockets import listening
from tests.polling import wait_for
from training.data import load_mnist

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
TEST = load_mnist().test
REST_PREDICT = "/v1/models/mnist:predict"
REST_BODY = json.dumps({"instances": TEST.images[:1].tolist()})
TOKEN = "edge-test-token-0123456789"
METADATA = [("authorization", f"Bearer {TOKEN}")]  # what stock gRPC clients add
HEADERS = {"Authorization": f"Bearer {TOKEN}"}  # what stock HTTP clients add


def _predict_request() -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "mnist"
    request.inputs["images"].CopyFrom(from_ndarray(TEST.images[:1], tensor_content=True))
    return request


@pytest.fixture(scope="module")
def app(tmp_path_factory, trained_export):
    work = tmp_path_factory.mktemp("store")
    store, tokens = work / "mnist", work / "tokens"
    tokens.write_text(f"{TOKEN}\n")
    publish_copy(trained_export, store, 1)
    with local_serve() as ports:
        run_local_app(store, args={"poll_interval_s": 0.5, "auth": {"token_file": str(tokens)}})
        yield {"ports": ports, "store": store, "export": trained_export, "tokens": tokens}


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    directory = tmp_path_factory.mktemp("pki")
    ca = CertificateAuthority(directory, "ca")
    other = CertificateAuthority(directory, "other-ca")
    return {
        "ca": ca,
        "server": ca.issue("server", server=True),
        "client": ca.issue("client", server=False),
        "stranger": other.issue("stranger", server=False),  # a client certificate from another CA
        "other": other,
    }


def _config(app, **overrides) -> EdgeConfig:
    ports = app["ports"]
    return EdgeConfig.model_validate(
        {
            "bind_host": "127.0.0.1",
            "grpc_port": free_port(),
            "http_port": free_port(),
            "upstream": {"grpc_port": ports.grpc_port, "http_port": ports.http_port},
            **overrides,
        }
    )


def _tls(pki, mutual: bool = False) -> dict:
    tls = {"server_cert": str(pki["server"].cert), "server_key": str(pki["server"].key)}
    if mutual:
        tls |= {"custom_ca": str(pki["ca"].cert), "client_verify": True}
    return tls


def _assert_gone(state_dir: Path, config: EdgeConfig) -> None:
    left = leftovers.wait_gone(lambda: leftovers.haproxy_processes(str(state_dir)), 10)
    leftovers.stop(left)
    assert not left, f"edge HAProxy still running: {leftovers.describe(left)}"
    assert not [p for p in (config.grpc_port, config.http_port) if port_in_use(p)]


@contextlib.contextmanager
def running_edge(config: EdgeConfig, state_dir: Path) -> Iterator[EdgeProcess]:
    edge = EdgeProcess(config, state_dir)
    edge.start()
    try:
        yield edge
    finally:
        assert edge.stop(grace_s=5) == []
        _assert_gone(state_dir, config)


# -- slow clients (issue 15, item 1) ----------------------------------------------------------------
def test_half_sent_requests_on_both_ports_leave_normal_clients_alone(app, tmp_path) -> None:
    """300 HTTP requests with 1 byte of their 1,000-byte body and 300 gRPC Predict streams with 1 byte
    of their message, kept open (reopened when cut): normal gRPC and REST clients beside them get
    every answer within their 5 s deadline. Without the edge, the HTTP crowd alone holds every
    replica slot (2 replicas x max_ongoing_requests 64) and normal requests time out."""
    config = _config(app, limits={"request_timeout_s": 2})
    with running_edge(config, tmp_path / "edge"):
        http_attack = SlowAttack(Target("127.0.0.1", config.http_port), 300, "http")
        grpc_attack = SlowAttack(Target("127.0.0.1", config.grpc_port), 300, "grpc")
        rest: dict[str, object] = {"ok": 0, "failed": []}
        stop = threading.Event()

        def rest_client() -> None:
            with requests.Session() as session:
                while not stop.is_set():
                    try:
                        answer = session.post(
                            f"http://127.0.0.1:{config.http_port}{REST_PREDICT}",
                            data=REST_BODY,
                            headers=HEADERS,
                            timeout=5,
                        )
                        answer.raise_for_status()
                        rest["ok"] += 1
                    except requests.RequestException as exc:
                        rest["failed"].append(repr(exc))

        with grpc.insecure_channel(f"127.0.0.1:{config.grpc_port}") as channel:
            normal_client(channel, _predict_request(), 1.0, metadata=METADATA)  # connected before the crowd
            with http_attack.running(), grpc_attack.running():
                time.sleep(1.0)
                thread = threading.Thread(target=rest_client, daemon=True)
                thread.start()
                grpc_result = normal_client(
                    channel, _predict_request(), 8.0, timeout_s=5.0, metadata=METADATA
                )
                stop.set()
                thread.join(timeout=10)
    print(f"beside the crowd: gRPC {grpc_result}, REST ok {rest['ok']}; attacks {vars(http_attack)}")
    assert grpc_result["failed"] == {} and grpc_result["ok"] > 50
    assert rest["failed"] == [] and rest["ok"] > 20
    assert http_attack.opened >= 300 and grpc_attack.opened >= 30  # the crowd really was there
    assert http_attack.closed_by_server > 0  # and the edge cut its requests (408 after 2 s)


def _half_sent(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(b"POST /v1/models/mnist:predict HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{")
    return sock


def _closed_at_once(sock: socket.socket) -> bool:
    sock.settimeout(2.0)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def _refused(port: int) -> bool:
    """A new half-sent request is refused: reset while connecting or sending, or closed at once."""
    try:
        sock = _half_sent(port)
    except (ConnectionResetError, ConnectionRefusedError, BrokenPipeError):
        return True
    with sock:
        return _closed_at_once(sock)


def test_connections_beyond_the_per_source_bound_are_refused(app, tmp_path) -> None:
    config = _config(app, limits={"max_connections_per_source": 8, "request_timeout_s": 30})
    with running_edge(config, tmp_path / "edge"):
        held = [_half_sent(config.http_port) for _ in range(8)]
        try:
            assert not _closed_at_once(held[-1])  # the 8th, within the bound: kept, waiting for its body
            assert _refused(config.http_port), "the 9th connection from one address was served"
            held.pop().close()
            time.sleep(0.5)
            answer = requests.get(
                f"http://127.0.0.1:{config.http_port}/v1/models/mnist", headers=HEADERS, timeout=5
            )
            assert answer.status_code == 200  # a place freed: served again
        finally:
            for sock in held:
                sock.close()


# -- TLS and mutual TLS (issue 16, item 1) ---------------------------------------------------------
@contextlib.contextmanager
def edge_command(config: EdgeConfig, tmp_path: Path) -> Iterator[Path]:
    """The edge as a cluster node runs it: ``python -m ray_app.edge run`` with a YAML file; stopped
    with ``python -m ray_app.edge stop``. Yields the pid file."""
    config_path, pid_file, state_dir = tmp_path / "edge.yaml", tmp_path / "edge.pid", tmp_path / "state"
    config_path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    edge_cmd = [sys.executable, "-m", "ray_app.edge"]
    process = subprocess.Popen(
        [*edge_cmd, "run", "--config", str(config_path), "--pid-file", str(pid_file), "--state-dir", str(state_dir)],
        cwd=REPO,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        wait_for(
            lambda: port_in_use(config.grpc_port) and port_in_use(config.http_port), 30, "edge ports open"
        )
        yield pid_file
    finally:
        stopped = subprocess.run(
            [*edge_cmd, "stop", "--pid-file", str(pid_file), "--timeout-s", "30"], cwd=REPO, timeout=60
        )
        process.wait(timeout=30)
        log = process.stderr.read()
        assert stopped.returncode == 0 and process.returncode == 0, log
        assert "edge: stopped" in log
        _assert_gone(state_dir, config)


def _grpc_tls(port: int, pki, client: str | None = None) -> grpc.Channel:
    issued = pki[client] if client else None
    credentials = grpc.ssl_channel_credentials(
        root_certificates=pki["ca"].cert.read_bytes(),
        private_key=issued.key.read_bytes() if issued else None,
        certificate_chain=issued.cert.read_bytes() if issued else None,
    )
    return grpc.secure_channel(f"localhost:{port}", credentials)


def _stock_predict(channel: grpc.Channel, metadata: list | None = METADATA) -> int:
    response = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(
        _predict_request(), timeout=30, metadata=metadata
    )
    return response.model_spec.version.value


def _our_client(*argv: str, token: str | None = TOKEN) -> subprocess.CompletedProcess:
    """client/grpc_client.py, its token from ``$MNIST_TOKEN`` (``--token-file`` where a test says so)."""
    env = {k: v for k, v in os.environ.items() if k != "MNIST_TOKEN"} | (
        {"MNIST_TOKEN": token} if token else {}
    )
    return subprocess.run(
        [sys.executable, "client/grpc_client.py", "--image", "data/0.png", "--host", "localhost",
         "--timeout-s", "30", "--json", *argv],
        cwd=REPO, capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip


def test_stock_clients_and_ours_over_tls_and_plaintext_refused(app, pki, tmp_path) -> None:
    config = _config(app, tls=_tls(pki))
    ca = str(pki["ca"].cert)
    with edge_command(config, tmp_path):
        with _grpc_tls(config.grpc_port, pki) as channel:
            assert _stock_predict(channel) in (1, 2)  # 2 once the rollout test has published it
            status = model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus(
                get_model_status_pb2.GetModelStatusRequest(model_spec={"name": "mnist"}),
                timeout=30,
                metadata=METADATA,
            )
            assert status.model_version_status[0].state == get_model_status_pb2.ModelVersionStatus.AVAILABLE
        https = f"https://localhost:{config.http_port}"
        answer = requests.post(https + REST_PREDICT, data=REST_BODY, headers=HEADERS, verify=ca, timeout=30)
        assert answer.status_code == 200 and len(answer.json()["predictions"]) == 1
        page = requests.get(https + "/", verify=ca, timeout=30)  # the web page (its fetches are relative)
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        if shutil.which("curl"):  # in the cluster image and on CI machines; not a Python dependency
            curl = subprocess.run(
                ["curl", "-sS", "--fail", "--cacert", ca, "-H", f"Authorization: Bearer {TOKEN}",
                 https + "/v1/models/mnist"],
                capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            assert curl.returncode == 0, curl.stderr
            assert json.loads(curl.stdout)["model_version_status"][0]["state"] == "AVAILABLE"
        for argv in (["--port", str(config.grpc_port)], ["--rest", "--port", str(config.http_port)]):
            ours = _our_client("--ca-cert", ca, *argv)
            assert ours.returncode == 0, ours.stderr
            assert json.loads(ours.stdout)["predictions"][0]["digit"] == 0  # data/0.png
            from_file = _our_client("--ca-cert", ca, "--token-file", str(app["tokens"]), *argv, token=None)
            assert from_file.returncode == 0, from_file.stderr
        # Refused over TLS: no token, or a wrong one (stock clients and ours, both ports).
        with _grpc_tls(config.grpc_port, pki) as channel:
            for metadata in (None, [("authorization", "Bearer guess")]):
                with pytest.raises(grpc.RpcError) as refused:
                    _stock_predict(channel, metadata)
                assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        unauthenticated = requests.post(https + REST_PREDICT, data=REST_BODY, verify=ca, timeout=30)
        assert unauthenticated.status_code == 401 and "error" in unauthenticated.json()
        for argv in (["--port", str(config.grpc_port)], ["--rest", "--port", str(config.http_port)]):
            tokenless = _our_client("--ca-cert", ca, *argv, token=None)
            assert tokenless.returncode != 0 and "Predicted Digit" not in tokenless.stdout
        # Refused: plaintext to a TLS port, and a server certificate the client does not trust.
        with grpc.insecure_channel(f"127.0.0.1:{config.grpc_port}") as plain:
            with pytest.raises(grpc.RpcError) as refused:
                _stock_predict(plain)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(requests.ConnectionError):
            requests.post(f"http://127.0.0.1:{config.http_port}{REST_PREDICT}", data=REST_BODY, timeout=10)
        with pytest.raises(requests.exceptions.SSLError):
            requests.get(https + "/v1/models/mnist", verify=str(pki["other"].cert), timeout=10)
        untrusted = _our_client("--tls", "--port", str(config.grpc_port))  # system CAs only
        assert untrusted.returncode != 0 and "cannot reach" in untrusted.stderr


def test_the_edge_listens_on_its_two_ports_only_and_keeps_its_sockets_private(app, pki, tmp_path) -> None:
    """Issue 16, item 3, for the edge's own processes (the supervisor, HAProxy's master and
    workers): TCP on the two configured ports of ``bind_host`` and nothing else (no stats page, no
    exporter), and unix sockets only in its 0700 state directory, each mode 600."""
    config = _config(app, tls=_tls(pki))
    with edge_command(config, tmp_path) as pid_file:
        supervisor = psutil.Process(int(pid_file.read_text()))
        inet, unix = listening([supervisor, *supervisor.children(recursive=True)])
        state_dir = tmp_path / "state"
        print("edge listens on:", sorted(inet), sorted(map(str, unix)))
        assert inet == {(config.bind_host, config.grpc_port), (config.bind_host, config.http_port)}
        # HAProxy binds `<name>.<pid>.tmp` and renames it into place: psutil reports the bound name.
        assert unix and all(path.parent == state_dir for path in unix), unix
        sockets = [path for path in state_dir.iterdir() if stat.S_ISSOCK(path.lstat().st_mode)]
        assert {path.name for path in sockets} >= {"admin.sock", "master.sock"}
        assert stat.S_IMODE(state_dir.stat().st_mode) == 0o700
        for path in sockets:
            assert stat.S_IMODE(path.lstat().st_mode) & 0o077 == 0, f"{path} is open to other users"


def test_mutual_tls_accepts_our_clients_only(app, pki, tmp_path) -> None:
    config = _config(app, tls=_tls(pki, mutual=True))
    ca = str(pki["ca"].cert)
    https = f"https://localhost:{config.http_port}{REST_PREDICT}"
    client = (str(pki["client"].cert), str(pki["client"].key))
    with edge_command(config, tmp_path):
        with _grpc_tls(config.grpc_port, pki, "client") as channel:
            assert _stock_predict(channel) in (1, 2)
        answer = requests.post(https, data=REST_BODY, headers=HEADERS, verify=ca, cert=client, timeout=30)
        assert answer.status_code == 200
        for argv in (["--port", str(config.grpc_port)], ["--rest", "--port", str(config.http_port)]):
            ours = _our_client("--ca-cert", ca, "--client-cert", client[0], "--client-key", client[1], *argv)
            assert ours.returncode == 0, ours.stderr
        # Refused: no client certificate, and one signed by another CA, on both ports.
        for who in (None, "stranger"):
            with _grpc_tls(config.grpc_port, pki, who) as channel:
                with pytest.raises(grpc.RpcError) as refused:
                    _stock_predict(channel)
                assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, who
            cert = (str(pki[who].cert), str(pki[who].key)) if who else None
            with pytest.raises((requests.exceptions.SSLError, requests.ConnectionError)):
                requests.post(https, data=REST_BODY, headers=HEADERS, verify=ca, cert=cert, timeout=10)
        ours = _our_client("--ca-cert", ca, "--port", str(config.grpc_port))
        assert ours.returncode != 0


def _served_certificate_issuer(port: int, cafile: Path) -> str:
    context = ssl.create_default_context(cafile=str(cafile))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            issuer = dict(item[0] for item in tls.getpeercert()["issuer"])
    return issuer["commonName"]


@pytest.mark.parametrize("how", ["reload-command", "file-watch"])
def test_certificate_rotation_fails_no_request(app, pki, tmp_path, how) -> None:
    """Replace the certificate and key files, then reload (``python -m ray_app.edge reload``, or the
    supervisor noticing the files changed): requests on open connections and new ones all succeed;
    new connections get the new certificate."""
    cert_dir = tmp_path / "live"
    cert_dir.mkdir()
    live_cert, live_key = cert_dir / "server.crt", cert_dir / "server.key"
    live_cert.write_bytes(pki["server"].cert.read_bytes())
    live_key.write_bytes(pki["server"].key.read_bytes())
    config = _config(
        app,
        tls={"server_cert": str(live_cert), "server_key": str(live_key)},
        certificate_check_interval_s=0.5 if how == "file-watch" else 3600,
    )
    both = tmp_path / "both-cas.pem"
    both.write_bytes(pki["ca"].cert.read_bytes() + pki["other"].cert.read_bytes())
    replacement = pki["other"].issue("server-2", server=True)
    failures: list[str] = []
    answered = [0]
    stop = threading.Event()

    def clients() -> None:
        credentials = grpc.ssl_channel_credentials(root_certificates=both.read_bytes())
        with (
            grpc.secure_channel(f"localhost:{config.grpc_port}", credentials) as channel,
            requests.Session() as s,
        ):
            while not stop.is_set():
                try:
                    _stock_predict(channel)
                    s.post(f"https://localhost:{config.http_port}{REST_PREDICT}", data=REST_BODY,
                           headers=HEADERS, verify=str(both), timeout=30).raise_for_status()  # fmt: skip
                    answered[0] += 1
                except (grpc.RpcError, requests.RequestException) as exc:
                    failures.append(repr(exc))

    with edge_command(config, tmp_path) as pid_file:
        assert _served_certificate_issuer(config.grpc_port, both) == "test ca"
        worker = threading.Thread(target=clients, daemon=True)
        worker.start()
        time.sleep(1.5)
        live_cert.write_bytes(replacement.cert.read_bytes())
        live_key.write_bytes(replacement.key.read_bytes())
        if how == "reload-command":
            reload = subprocess.run(
                [sys.executable, "-m", "ray_app.edge", "reload", "--pid-file", str(pid_file)],
                cwd=REPO,
                timeout=60,
            )
            assert reload.returncode == 0
        wait_for(
            lambda: _served_certificate_issuer(config.http_port, both) == "test other-ca", 15, "new cert"
        )
        time.sleep(1.5)
        stop.set()
        worker.join(timeout=60)
    assert failures == [] and answered[0] > 10


# -- the front door's guarantees through the TLS edge ---------------------------------------------
def test_new_version_rolls_out_through_the_tls_edge_without_failures(app, pki, tmp_path) -> None:
    config = _config(app, tls=_tls(pki))
    seen: list[int] = []
    failures: list[str] = []
    stop = threading.Event()

    def grpc_client() -> None:
        with _grpc_tls(config.grpc_port, pki) as channel:
            while not stop.is_set():
                try:
                    seen.append(_stock_predict(channel))
                except grpc.RpcError as exc:
                    failures.append(f"gRPC {exc.code()}: {exc.details()}")

    def rest_client() -> None:
        with requests.Session() as session:
            while not stop.is_set():
                try:
                    answer = session.post(f"https://localhost:{config.http_port}{REST_PREDICT}", data=REST_BODY,
                                          headers=HEADERS, verify=str(pki["ca"].cert), timeout=30)  # fmt: skip
                    answer.raise_for_status()
                    seen.append(int(answer.headers["X-Model-Version"]))
                except requests.RequestException as exc:
                    failures.append(f"REST {exc}")

    with running_edge(config, tmp_path / "edge"):
        threads = [threading.Thread(target=f, daemon=True) for f in (grpc_client, grpc_client, rest_client)]
        for thread in threads:
            thread.start()
        time.sleep(1.0)
        publish_copy(app["export"], app["store"], 2)
        published = time.monotonic()
        # Until every replica answers version 2 (each loads it on its own poll): on a loaded 2-core
        # machine one can take well over 30 s to load and warm it up.
        while set(seen[-20:]) != {2} and time.monotonic() - published < 120:
            time.sleep(0.05)
        time.sleep(1.0)
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
    assert failures == [], failures[:3]
    assert 1 in seen and seen[-1] == 2


def test_killing_a_replica_behind_the_tls_edge_fails_no_later_request(app, pki, tmp_path) -> None:
    """tests/integration/test_faults.py's scenario, the clients going through the TLS edge."""
    config = _config(app, tls=_tls(pki))
    with running_edge(config, tmp_path / "edge"):
        run = kill_a_replica_under_load(
            lambda: _grpc_tls(config.grpc_port, pki), _predict_request(), clients=4, metadata=METADATA
        )
    print(f"replica kill through the TLS edge: {run.summary()}")
    assert_only_the_victims_requests_failed(run, clients=4)


# -- supervision -----------------------------------------------------------------------------------
def _edge_haproxy(state_dir: Path) -> list:
    return leftovers.haproxy_processes(str(state_dir))


def test_supervisor_restarts_haproxy_and_never_leaves_it_orphaned(tmp_path) -> None:
    """HAProxy killed: the supervisor starts it again. The supervisor killed (SIGKILL, no clean-up
    of its own): HAProxy goes too and the ports close, rather than staying up unwatched."""
    config = EdgeConfig(
        bind_host="127.0.0.1",
        grpc_port=free_port(),
        http_port=free_port(),
        upstream={"grpc_port": free_port(), "http_port": free_port()},  # nothing behind: not needed here
    )
    config_path, state_dir = tmp_path / "edge.yaml", tmp_path / "state"
    config_path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    log_path = tmp_path / "supervisor.log"
    with open(log_path, "wb") as log:
        supervisor = subprocess.Popen(
            [sys.executable, "-u", "-m", "ray_app.edge", "run", "--config", str(config_path), "--state-dir", str(state_dir)],
            cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip

    def logs() -> str:
        haproxy_log = state_dir / "haproxy.log"
        return f"supervisor:\n{log_path.read_text()[-3000:]}\nHAProxy:\n" + (
            haproxy_log.read_text(errors="replace")[-2000:] if haproxy_log.exists() else "(no log)"
        )

    try:
        # Up once the supervisor says so (both ports open): a HAProxy killed while its first start is
        # still being checked is a failed start, which the supervisor reports and exits on.
        wait_for(
            lambda: " serving gRPC " in log_path.read_text() and len(_edge_haproxy(state_dir)) >= 2,
            30,
            "edge up",
        )
        first = {p.pid for p in _edge_haproxy(state_dir)}
        for process in _edge_haproxy(state_dir):
            process.kill()
        try:
            wait_for(
                lambda: port_in_use(config.http_port) and {p.pid for p in _edge_haproxy(state_dir)} - first,
                30,
                "HAProxy started again by its supervisor",
            )
        except pytest.fail.Exception as exc:
            pytest.fail(f"{exc}\n{logs()}")
        supervisor.kill()
        supervisor.wait(timeout=10)
        _assert_gone(state_dir, config)
    finally:
        if supervisor.poll() is None:
            supervisor.kill()
        leftovers.stop(_edge_haproxy(state_dir))
