"""Bearer tokens on the data path: who gets in, who is refused and why, and rotation without a redeploy."""

from __future__ import annotations

import dataclasses
import json
import random
from types import SimpleNamespace

import grpc
import pytest
from fastapi import FastAPI
from fastapi.responses import PlainTextResponse

from ray_app import auth, grpc_methods
from ray_app.auth import MALFORMED, MISSING, WRONG, BearerTokenMiddleware, TokenAuth
from ray_app.config import AppConfig, LiveConfig
from ray_app.deployment import MnistServer
from ray_app.predictor import Predictor
from ray_app.protocol.protos import get_model_status_pb2
from tests.unit.conftest import run_on_replica_loop
from tests.unit.static_backend import StaticBackend


class _Clock:
    def __init__(self) -> None:
        self.now_s = 0.0

    def __call__(self) -> float:
        return self.now_s


@pytest.fixture
def token_file(tmp_path):
    path = tmp_path / "tokens"
    path.write_text("# serving tokens\nold-token\n\n  new-token  \n")
    return path


def test_tokens_in_the_file_get_in_others_are_refused_by_reason(token_file) -> None:
    refusals: list[tuple[str, str]] = []
    checker = TokenAuth(token_file, on_refusal=lambda protocol, why: refusals.append((protocol, why)))
    assert checker.refusal("Bearer old-token", "grpc") is None
    assert checker.refusal("bearer new-token", "rest") is None  # the scheme is case-insensitive
    assert checker.refusal(None, "grpc") == MISSING
    assert checker.refusal("Basic b2xkLXRva2Vu", "rest") == MALFORMED
    assert checker.refusal("Bearer", "rest") == MALFORMED
    assert checker.refusal("Bearer # serving tokens", "rest") == MALFORMED
    assert checker.refusal("Bearer old-token2", "grpc") == WRONG
    assert checker.refusal("Bearer old-toke", "grpc") == WRONG
    assert refusals == [
        ("grpc", MISSING), ("rest", MALFORMED), ("rest", MALFORMED), ("rest", MALFORMED),
        ("grpc", WRONG), ("grpc", WRONG),
    ]  # fmt: skip


def test_a_rotated_file_is_read_again_without_a_restart(token_file) -> None:
    clock = _Clock()
    checker = TokenAuth(token_file, reload_interval_s=1.0, clock=clock)
    token_file.write_text("newest-token\n")  # old-token removed, as the last step of a rotation
    clock.now_s = 0.5
    assert checker.refusal("Bearer old-token", "rest") is None  # not looked at again yet
    clock.now_s = 1.5
    assert checker.refusal("Bearer old-token", "rest") == WRONG
    assert checker.refusal("Bearer newest-token", "rest") is None


def test_a_missing_or_empty_token_file_lets_nobody_in(tmp_path, token_file) -> None:
    assert TokenAuth(tmp_path / "absent").refusal("Bearer old-token", "rest") == WRONG
    token_file.write_text("# no tokens yet\n")
    assert TokenAuth(token_file).refusal("Bearer anything", "rest") == WRONG
    clock = _Clock()
    checker = TokenAuth(token_file, clock=clock)
    token_file.write_text("late-token\n")
    clock.now_s = 2
    assert checker.refusal("Bearer late-token", "rest") is None  # it gets in once the file has it


def test_tokens_never_appear_in_the_log(token_file, caplog) -> None:
    caplog.set_level("DEBUG")
    checker = TokenAuth(token_file)
    checker.refusal("Bearer wrong-guess", "rest")
    assert (
        "old-token" not in caplog.text and "new-token" not in caplog.text and "wrong-guess" not in caplog.text
    )


# -- HTTP: the middleware every route of the replica's app goes through -----------------------------
@pytest.fixture
def http_client(token_file):
    app = FastAPI()
    app.add_middleware(BearerTokenMiddleware)

    @app.get("/")
    async def page():
        return PlainTextResponse("page")

    @app.get("/static/{name}")
    async def static(name: str):
        return PlainTextResponse(name)

    @app.api_route("/{path:path}", methods=["GET", "POST"])
    async def api(path: str):  # stands for every API route, /v1/... /v2/... /api/... alike
        return PlainTextResponse(f"api {path}")

    auth.install(TokenAuth(token_file))
    try:
        yield _AsgiClient(app)
    finally:
        auth.install(None)


class _AsgiClient:
    """Calls an ASGI app in-process (Starlette's TestClient needs a package we do not install)."""

    def __init__(self, app, root_path: str = "") -> None:
        self._app, self._root_path = app, root_path

    def request(self, method: str, path: str, headers=None, content: bytes = b""):
        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
            "scheme": "http", "path": self._root_path + path, "raw_path": (self._root_path + path).encode(), "query_string": b"",
            "root_path": self._root_path, "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()],
            "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
        }  # fmt: skip
        messages = [{"type": "http.request", "body": content, "more_body": False}]
        sent: list[dict] = []

        async def receive():
            return messages.pop(0) if messages else {"type": "http.disconnect"}

        async def send(message):
            sent.append(message)

        run_on_replica_loop(self._app(scope, receive, send))
        start = next(m for m in sent if m["type"] == "http.response.start")
        body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
        return SimpleNamespace(
            status_code=start["status"],
            headers={k.decode(): v.decode() for k, v in start["headers"]},
            text=body.decode(),
        )

    def get(self, path: str, headers=None):
        return self.request("GET", path, headers)

    def post(self, path: str, headers=None, content: bytes = b""):
        return self.request("POST", path, headers, content)


@pytest.mark.parametrize("path", ["/v1/models/mnist:predict", "/v2/models/mnist/infer", "/api/models/mnist"])
@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ({}, "authentication required"),
        ({"Authorization": "Token old-token"}, "malformed authorization"),
        ({"Authorization": "Bearer guess"}, "invalid token"),
    ],
    ids=["missing", "malformed", "wrong"],
)
def test_every_api_path_answers_401_with_tf_servings_error_body(http_client, path, headers, message) -> None:
    response = http_client.post(path, headers=headers, content=b"{}")
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert message in json.loads(response.text)["error"]


def test_a_valid_token_passes_and_the_page_stays_open(http_client) -> None:
    assert http_client.post(
        "/v1/models/mnist:predict", headers={"Authorization": "Bearer new-token"}
    ).text == ("api v1/models/mnist:predict")
    assert http_client.get("/").text == "page"
    assert http_client.get("/static/app.js").text == "app.js"


def test_the_page_stays_open_under_a_route_prefix(http_client) -> None:
    prefixed = _AsgiClient(http_client._app, root_path="/mnist")
    assert prefixed.get("/").status_code == 200
    assert prefixed.get("/v1/models/mnist").status_code == 401


def test_without_a_token_file_nothing_is_checked(http_client) -> None:
    auth.install(None)
    assert http_client.post("/v1/models/mnist:predict").status_code == 200


# -- gRPC: the wrapper every method of the deployment goes through ----------------------------------
class _Context:
    """What the deployment uses of Serve's RayServegRPCContext."""

    def __init__(self, metadata) -> None:
        self._metadata = metadata
        self.code, self.details = None, ""

    def invocation_metadata(self):
        return self._metadata

    def set_code(self, code) -> None:
        self.code = code

    def set_details(self, details: str) -> None:
        self.details = details


@pytest.fixture(autouse=True)
def _batching_outside_a_replica(replica_context):
    """The predictor's ``@serve.batch`` queue is per process: once another test made it, changing its
    batch size asks for the replica's config, which the stand-in context provides."""
    return replica_context


def _predictor() -> Predictor:
    """A real predictor over a stand-in backend: what a method may touch before its token check."""
    predictor = Predictor(AppConfig(), StaticBackend(versions=(1,)), rng=random.Random(0))
    predictor.reconfigure(LiveConfig())
    return predictor


def _grpc_call(checker: TokenAuth | None, metadata, monkeypatch) -> tuple[_Context, list, list]:
    server_class = MnistServer.func_or_class
    handled, observed = [], []
    replica = SimpleNamespace(
        _auth=checker,
        _predictor=_predictor(),
        _observe=lambda protocol, method, started_s, outcome, *rest: observed.append(outcome),
    )

    async def handle(predictor, raw, deadline_s):
        handled.append(raw)
        return get_model_status_pb2.GetModelStatusResponse()

    watched = dataclasses.replace(grpc_methods.METHODS["GetModelStatus"], handle=handle)
    monkeypatch.setitem(grpc_methods.METHODS, "GetModelStatus", watched)
    context = _Context(metadata)
    run_on_replica_loop(server_class._grpc(replica, "GetModelStatus", b"raw", context))
    return context, handled, observed


@pytest.mark.parametrize(
    ("metadata", "details"),
    [
        ([("application", "mnist")], "authentication required"),
        ([("authorization", "old-token")], "malformed"),
        ([("authorization", "Bearer nope")], "invalid token"),
    ],
    ids=["missing", "malformed", "wrong"],
)
def test_grpc_calls_without_a_valid_token_are_unauthenticated_and_never_handled(
    token_file, metadata, details, monkeypatch
) -> None:
    context, handled, observed = _grpc_call(TokenAuth(token_file), metadata, monkeypatch)
    assert context.code == grpc.StatusCode.UNAUTHENTICATED and details in context.details
    assert handled == [] and len(observed) == 1


def test_grpc_calls_with_a_valid_token_are_handled(token_file, monkeypatch) -> None:
    context, handled, _ = _grpc_call(
        TokenAuth(token_file), [("authorization", "Bearer old-token")], monkeypatch
    )
    assert context.code is None and handled == [b"raw"]
    context, handled, _ = _grpc_call(None, [], monkeypatch)  # auth off
    assert context.code is None and handled == [b"raw"]


def test_every_grpc_method_of_the_deployment_goes_through_the_checked_wrapper(token_file) -> None:
    """Each RPC the deployment defines (PredictionService, ModelService, and any added later)
    answers UNAUTHENTICATED without a token: none bypasses ``_grpc``."""
    server_class = MnistServer.func_or_class
    ours = [klass for klass in server_class.__mro__ if klass.__module__ == "ray_app.deployment"]
    methods = sorted({name for klass in ours for name in vars(klass) if name[:1].isupper()})
    assert {"Predict", "GetModelStatus", "HandleReloadConfigRequest"} <= set(methods)
    replica = SimpleNamespace(_auth=TokenAuth(token_file), _predictor=_predictor(), _observe=lambda *a: None)
    replica._grpc = lambda *args, **kwargs: server_class._grpc(replica, *args, **kwargs)
    for name in methods:
        context = _Context([])
        run_on_replica_loop(getattr(server_class, name)(replica, b"", context))
        assert context.code == grpc.StatusCode.UNAUTHENTICATED, name


# -- our client sends it ------------------------------------------------------------------------------
def test_the_client_takes_the_token_from_a_flag_a_file_or_the_environment(tmp_path, monkeypatch) -> None:
    from client.grpc_client import parse_args

    monkeypatch.delenv("MNIST_TOKEN", raising=False)
    assert parse_args(["--image", "x.png"]).token is None
    assert parse_args(["--image", "x.png", "--token", "t1"]).token == "t1"
    (tmp_path / "token").write_text("t2\n")
    assert parse_args(["--image", "x.png", "--token-file", str(tmp_path / "token")]).token == "t2"
    monkeypatch.setenv("MNIST_TOKEN", "t3")
    config = parse_args(["--image", "x.png"])
    assert config.token == "t3" and "t3" not in repr(config)
