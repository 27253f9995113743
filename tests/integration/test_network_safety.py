"""Safe on a network (docs/security.md), on one running app behind the front door:

* bearer tokens hold through the front door and directly at a replica's own direct-ingress
  ports, on gRPC and REST, and a rotated token file takes effect without a redeploy; Serve's
  health probe stays open; refusals are counted by reason; the web page sends the token typed
  into it;
* a version altered after publishing into another valid SavedModel is never served, and the
  refusal is counted;
* every socket the app's processes listen on is on loopback or in the documented allow-list,
  and HAProxy's admin socket is not writable by other users.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import psutil
import pytest
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from ray_app.protocol.tensors import from_ndarray
from tests.conftest import HAPROXY_STATE_DIR_VARIABLE, publish_copy, tamper_with_weights
from tests.integration import prometheus
from tests.integration.browser import chromium, needs_browser, text, wait
from tests.integration.cluster import cluster_processes, local_serve, run_local_app
from tests.integration.sockets import listening, writable_by_other_users
from tests.polling import wait_for
from training.data import load_mnist

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TOKEN = "first-token-0123456789"
REPLICA_TITLE = "ray::ServeReplica:mnist:MnistServer"
HAPROXY_MODE = os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") == "1"


@pytest.fixture(scope="module")
def app(tmp_path_factory, trained_export):
    import ray

    work = tmp_path_factory.mktemp("netsafe")
    tokens = work / "tokens"
    tokens.write_text(f"{TOKEN}\n")
    store = work / "mnist"
    publish_copy(trained_export, store, 1)
    with local_serve() as ports:
        run_local_app(
            store, num_replicas=1, args={"auth": {"token_file": str(tokens), "reload_interval_s": 0.5}}
        )
        node_id = ray.get_runtime_context().get_node_id()
        yield {"ports": ports, "tokens": tokens, "store": store, "export": trained_export, "node": node_id}


def _predict_request() -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "mnist"
    request.inputs["images"].CopyFrom(from_ndarray(load_mnist().test.images[:1], tensor_content=True))
    return request


def _grpc_predict(address: str, token: str | None) -> tuple[str, int | None]:
    metadata = [("authorization", f"Bearer {token}")] if token else None
    with grpc.insecure_channel(address) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        try:
            response = stub.Predict(_predict_request(), timeout=30, metadata=metadata)
        except grpc.RpcError as exc:
            return exc.code().name, None
    return "OK", response.model_spec.version.value


def _http(url: str, token: str | None, body: bytes | None = None) -> tuple[int, dict, dict]:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=body, headers=headers, method="POST" if body else "GET")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            raw, status, answer_headers = response.read(), response.status, dict(response.headers)
    except urllib.error.HTTPError as exc:
        raw, status, answer_headers = exc.read(), exc.code, dict(exc.headers)
    try:
        return status, json.loads(raw), answer_headers
    except ValueError:
        return status, {"text": raw.decode(errors="replace")}, answer_headers


PREDICT_BODY = json.dumps({"instances": load_mnist().test.images[:1].tolist()}).encode()


def _ready(app) -> None:
    wait_for(
        lambda: _grpc_predict(app["ports"].grpc_address, TOKEN)[0] == "OK",
        120,
        "the app answering",
        ignore=(Exception,),
    )


def _replica_listeners(node_id: str) -> list[int]:
    replicas = []
    for process in cluster_processes(node_id):
        with contextlib.suppress(psutil.NoSuchProcess):
            if (process.cmdline() or [""])[0].startswith(REPLICA_TITLE):
                replicas.append(process)
    inet, _ = listening(replicas)
    return sorted({port for _, port in inet})


def _haproxy_server_ports(node_id: str) -> set[int]:
    """The ports HAProxy forwards to: the ``server`` lines of the node's config, the fallback
    proxy's ``backup`` lines left out. A replica also listens on random ports (its core worker's and
    Serve's inter-deployment gRPC servers, bound to port 0), which can fall inside the
    direct-ingress ranges, so a port's range alone does not say what answers there."""
    where = Path(os.environ["RAY_SERVE_HAPROXY_CONFIG_FILE_LOC"])
    config = (where.parent / node_id / where.name).read_text()  # haproxy.py's _per_node
    return {
        int(match["port"])
        for match in re.finditer(r"^\s*server\s+\S+\s+\S+:(?P<port>\d+)(?P<rest>.*)$", config, re.MULTILINE)
        if "backup" not in match["rest"].split()
    }


# -- B: tokens wherever a request can enter ------------------------------------------------------------
def test_tokens_are_required_through_the_front_door(app) -> None:
    _ready(app)
    ports = app["ports"]
    assert _grpc_predict(ports.grpc_address, None)[0] == "UNAUTHENTICATED"
    assert _grpc_predict(ports.grpc_address, "guess")[0] == "UNAUTHENTICATED"
    assert _grpc_predict(ports.grpc_address, TOKEN)[0] == "OK"
    status, body, headers = _http(f"{ports.http}/v1/models/mnist:predict", None, PREDICT_BODY)
    assert status == 401 and "authentication required" in body["error"]
    assert _http(f"{ports.http}/v1/models/mnist", "guess")[0] == 401
    assert _http(f"{ports.http}/api/models/mnist", None)[0] == 401  # the page's panel data too
    status, body, _ = _http(f"{ports.http}/v1/models/mnist:predict", TOKEN, PREDICT_BODY)
    assert status == 200 and len(body["predictions"]) == 1
    page = urllib.request.urlopen(f"{ports.http}/", timeout=30)  # the page itself stays open
    assert page.status == 200


def test_the_health_probe_stays_open_and_refusals_are_counted_by_reason(app) -> None:
    _ready(app)
    ports = app["ports"]
    with urllib.request.urlopen(f"{ports.http}/-/healthz", timeout=30) as probe:  # no token
        assert probe.status == 200
    assert _grpc_predict(ports.grpc_address, None)[0] == "UNAUTHENTICATED"  # missing
    assert _grpc_predict(ports.grpc_address, "guess")[0] == "UNAUTHENTICATED"  # wrong
    assert _http(f"{ports.http}/v1/models/mnist", None)[0] == 401  # missing
    request = urllib.request.Request(f"{ports.http}/v1/models/mnist", headers={"Authorization": "Basic eDp5"})
    with pytest.raises(urllib.error.HTTPError) as malformed:
        urllib.request.urlopen(request, timeout=30)
    assert malformed.value.code == 401

    def counted(text: str) -> set[tuple[str, str]]:
        return {
            (labels["protocol"], labels["reason"])
            for labels, value in prometheus.samples(text, "ray_mnist_auth_refusals_total")
            if value >= 1 and labels.get("model") == "mnist"
        }

    wanted = {("grpc", "missing"), ("grpc", "wrong"), ("rest", "missing"), ("rest", "malformed")}
    text = prometheus.scrape_until(lambda text: wanted <= counted(text))
    assert wanted <= counted(text), sorted(counted(text))


@needs_browser
def test_the_web_page_sends_the_token_typed_into_it(app, tmp_path) -> None:
    """Without a token the page says why it cannot answer; with the token typed in, it reads 0.png."""
    from selenium.webdriver.common.keys import Keys

    _ready(app)
    image = str(Path(__file__).resolve().parents[2] / "data" / "0.png")
    with chromium(tmp_path / "chromium-profile") as browser:
        browser.get(app["ports"].http + "/")
        wait(browser, lambda b: "authentication required" in text(b, "#panel-status"))
        browser.find_element("id", "file").send_keys(image)
        wait(browser, lambda b: text(b, "#status").startswith("Error 401"))
        browser.find_element("id", "token").send_keys(TOKEN, Keys.TAB)  # TAB: the field's change event
        wait(browser, lambda b: b.find_elements("css selector", "#versions tbody tr[data-version]"))
        browser.find_element("id", "file").send_keys(image)
        wait(browser, lambda b: text(b, "#status").startswith("Answered in"))
        assert text(browser, "#digit") == "0"


@pytest.mark.skipif(not HAPROXY_MODE, reason="direct ingress exists only in HAProxy mode")
def test_tokens_are_required_at_a_replicas_own_ports(app) -> None:
    """HAProxy forwards to these; anyone who can reach them must still show a token."""
    from ray.serve._private import constants

    _ready(app)
    forwarded_to = _haproxy_server_ports(app["node"])
    listening = [port for port in _replica_listeners(app["node"]) if port in forwarded_to]
    http_range = range(
        constants.RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT, constants.RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT
    )
    grpc_range = range(
        constants.RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT, constants.RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT
    )
    http_ports = [p for p in listening if p in http_range]
    grpc_ports = [p for p in listening if p in grpc_range]
    assert http_ports and grpc_ports, (
        f"HAProxy forwards to {sorted(forwarded_to)}, replica listens on {listening}"
    )
    for port in http_ports:
        assert _http(f"http://127.0.0.1:{port}/v1/models/mnist:predict", None, PREDICT_BODY)[0] == 401
        assert _http(f"http://127.0.0.1:{port}/v1/models/mnist", TOKEN)[0] == 200
    for port in grpc_ports:
        assert _grpc_predict(f"127.0.0.1:{port}", None)[0] == "UNAUTHENTICATED"
        assert _grpc_predict(f"127.0.0.1:{port}", "guess")[0] == "UNAUTHENTICATED"
        assert _grpc_predict(f"127.0.0.1:{port}", TOKEN)[0] == "OK"


def test_a_rotated_token_file_takes_effect_without_a_redeploy(app) -> None:
    _ready(app)
    address = app["ports"].grpc_address
    app["tokens"].write_text(f"{TOKEN}\nsecond-token-9876543210\n")  # add the new one...
    wait_for(
        lambda: _grpc_predict(address, "second-token-9876543210")[0] == "OK",
        30,
        "the new token valid",
        ignore=(Exception,),
    )
    app["tokens"].write_text("second-token-9876543210\n")  # ...then retire the old one
    wait_for(
        lambda: _grpc_predict(address, TOKEN)[0] == "UNAUTHENTICATED",
        30,
        "the old token refused",
        ignore=(Exception,),
    )
    app["tokens"].write_text(f"{TOKEN}\n")
    wait_for(
        lambda: _grpc_predict(address, TOKEN)[0] == "OK", 30, "the first token back", ignore=(Exception,)
    )


# -- A: a tampered version is refused, the last good one keeps serving ------------------------------------
def test_a_version_altered_after_publishing_is_never_served(app) -> None:
    _ready(app)
    # Published by training's code path, altered, then moved into the served store in one rename
    # (the replica polls every second: altering it in place could race its first load).
    tampered = publish_copy(app["export"], app["store"].parent / "elsewhere", 2)
    tamper_with_weights(tampered)
    os.rename(tampered, app["store"] / "2")
    url = f"{app['ports'].http}/v1/models/mnist"

    def refused() -> bool:
        statuses = {s["version"]: s for s in _http(url, TOKEN)[1]["model_version_status"]}
        return statuses.get("2", {}).get("state") == "END"

    wait_for(refused, 60, "version 2 refused", ignore=(Exception,))
    statuses = {s["version"]: s for s in _http(url, TOKEN)[1]["model_version_status"]}
    assert statuses["2"]["status"]["error_code"] == "DATA_LOSS"
    assert "IntegrityError" in statuses["2"]["status"]["error_message"]
    for _ in range(10):
        assert _grpc_predict(app["ports"].grpc_address, TOKEN) == ("OK", 1)

    def counted(text: str) -> bool:
        return any(
            labels.get("version") == "2" and labels.get("reason") == "IntegrityError" and value >= 1
            for labels, value in prometheus.samples(text, "ray_mnist_version_load_failures_total")
        )

    assert counted(prometheus.scrape_until(counted)), "the refused version was not counted"


# -- C: nothing listens that should not ---------------------------------------------------------------------
def _is_loopback(address: str) -> bool:
    return ipaddress.ip_address(address.split("%")[0]).is_loopback


RAY_OWN_TITLES = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")  # Ray's agents (titled like workers)


def _actor_ports() -> dict[int, int]:
    """Each live actor's process id -> its core worker's gRPC port (from the GCS actor table)."""
    from ray._private import state

    table = state.state.actor_table(None, None, "ALIVE")
    return {info["Pid"]: info["Address"]["Port"] for info in table.values()}


def _wide_listener_reason(
    process: psutil.Process, ip: str, port: int, actor_ports: dict[int, int]
) -> str | None:
    """Why a socket of the app may listen beyond loopback (docs/security.md, "What listens"), or None."""
    from ray.serve._private import constants

    title = (process.cmdline() or [""])[0]
    name = process.name()
    any_v6 = ip == "::"
    if name == "haproxy" and str(port) in (  # this cluster's (tests/integration/cluster.fresh_side_ports)
        os.environ.get("RAY_SERVE_HAPROXY_STATS_PORT", str(constants.RAY_SERVE_HAPROXY_STATS_PORT)),
        os.environ.get("RAY_SERVE_HAPROXY_METRICS_PORT", str(constants.RAY_SERVE_HAPROXY_METRICS_PORT)),
    ):
        return "HAProxy stats/metrics: Ray 2.60's template binds them to all interfaces, no switch"
    if actor_ports.get(process.pid) == port:
        return "the actor's Ray core worker gRPC server: cluster-internal, Ray's token auth"
    if title.startswith(REPLICA_TITLE) and any_v6:
        if port in range(
            constants.RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT, constants.RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT
        ):
            return (
                "replica direct-ingress gRPC: grpc_util binds [::], no switch; tokens checked in the replica"
            )
        return "Serve's inter-deployment gRPC server: replica.py binds [::]:0, no switch; Ray's token auth"
    if title.startswith("ray::ProxyActor") and any_v6:
        return "fallback proxy gRPC: grpc_util binds [::], no switch; tokens checked in the replica"
    if name in ("gcs_server", "raylet") or title.startswith(RAY_OWN_TITLES):
        return "Ray's own cluster ports (GCS, raylet, object manager, agents): other nodes reach them; Ray's token auth"
    return None


def test_every_listening_socket_is_on_loopback_or_in_the_allow_list(app) -> None:
    _ready(app)
    unexplained, wide, wide_ports = [], [], set()
    actor_ports = _actor_ports()
    for process in cluster_processes(app["node"]):
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            for connection in process.net_connections(kind="inet"):
                if connection.status != psutil.CONN_LISTEN or _is_loopback(connection.laddr.ip):
                    continue
                reason = _wide_listener_reason(
                    process, connection.laddr.ip, connection.laddr.port, actor_ports
                )
                entry = f"{process.name()} {(process.cmdline() or [''])[0]} {connection.laddr.ip}:{connection.laddr.port}"
                (wide if reason else unexplained).append(f"{entry}: {reason}")
                wide_ports.add(connection.laddr.port)
    print("\n".join(["listening beyond loopback:", *wide]))
    assert not unexplained, f"listening beyond loopback without a documented reason: {unexplained}"
    # the serving ports are where the config put them (http_options.host: loopback in these tests)
    assert app["ports"].http_port not in wide_ports


@pytest.mark.skipif(not HAPROXY_MODE, reason="HAProxy mode only")
def test_haproxys_admin_socket_is_not_writable_by_other_users() -> None:
    state_dir = Path(os.environ[HAPROXY_STATE_DIR_VARIABLE])
    sockets = list(state_dir.rglob("admin.sock"))
    assert sockets, f"no admin socket under {state_dir}"
    for path in sockets:
        assert not writable_by_other_users(path), f"{path} can be written by other users"
