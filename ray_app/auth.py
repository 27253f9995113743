"""Bearer-token authentication on the data path: one check every API request goes through.

Tokens live in a file (``AppConfig.auth.token_file``: one token a line, ``#`` comments and blank
lines ignored), typically a Kubernetes Secret or a file only the serving user can read. Several
tokens are valid at once, so a new one can be added before the old one is removed (rotation);
the file is re-read when it changes (its inode, size or modification time, checked at most every
``reload_interval_s``), so rotation needs no redeploy. A missing, unreadable or empty file lets
nobody in (fail closed). Tokens are compared in constant time against every configured token
(``hmac.compare_digest``) and never logged.

Where the check runs, so that it holds however a request enters (HAProxy, the Python proxy, or a
replica's own direct-ingress port), is the replica itself:

* gRPC: ``authorization: Bearer <token>`` metadata, checked in ``MnistServer._grpc``, the wrapper
  every gRPC method goes through; refused with ``UNAUTHENTICATED``.
* HTTP: the ``Authorization: Bearer <token>`` header, checked by :class:`BearerTokenMiddleware`
  on the replica's ASGI app for every path but :data:`OPEN_PATHS` / :data:`OPEN_PREFIXES`
  (the web page and its static files); refused with 401, ``WWW-Authenticate: Bearer`` and TF
  Serving's error body ``{"error": "..."}``. New routes are covered without any change here.

Serve's own probes (``/-/healthz``, ``/-/routes``, and the health checks HAProxy and the
controller make) never reach the app's routes, so they stay open (docs/security.md).
"""

from __future__ import annotations

import hmac
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

logger = logging.getLogger("ray.serve")

OPEN_PATHS = frozenset({"/", "/favicon.ico"})  # the web page (it asks for a token itself)
OPEN_PREFIXES = ("/static/",)  # the page's script and style
SCHEME = "bearer"
MAX_TOKEN_FILE_BYTES = 64 * 1024
MAX_HEADER_CHARS = 4096

# Why a request was refused: the metric's reason tag.
MISSING, MALFORMED, WRONG = "missing", "malformed", "wrong"
MESSAGES = {
    MISSING: "authentication required: send 'authorization: Bearer <token>'",
    MALFORMED: "malformed authorization: expected 'Bearer <token>'",
    WRONG: "invalid token",
}


def parse_tokens(text: str) -> list[bytes]:
    """The tokens of a token file: one a line, ``#`` comments and blank lines ignored."""
    tokens = []
    for line in text.splitlines():
        token = line.strip()
        if token and not token.startswith("#"):
            tokens.append(token.encode())
    return tokens


def credential(header: str | None) -> tuple[bytes | None, str | None]:
    """(token, None) from an ``Authorization`` value, or (None, why) when it is missing or malformed."""
    if header is None or not header.strip():
        return None, MISSING
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if len(header) > MAX_HEADER_CHARS or scheme.lower() != SCHEME or not token or " " in token:
        return None, MALFORMED
    return token.encode(), None


def matches(token: bytes, valid: Iterable[bytes]) -> bool:
    """Whether ``token`` is one of ``valid``; compares with every one, each in constant time."""
    found = False
    for candidate in valid:
        found |= hmac.compare_digest(token, candidate)
    return found


class TokenAuth:
    """The token file of one replica, re-read when it changes; ``refusal()`` is the check."""

    def __init__(
        self,
        token_file: str | os.PathLike[str],
        reload_interval_s: float = 1.0,
        on_refusal: Callable[[str, str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._path = Path(token_file).expanduser()
        self._reload_interval_s = reload_interval_s
        self._on_refusal = on_refusal  # (protocol, reason), e.g. AppMetrics.auth_refused
        self._clock = clock
        self._lock = threading.Lock()
        self._tokens: list[bytes] = []
        self._stamp: tuple[int, int, int] | None = None
        self._unreadable = False
        self._reload()
        self._checked_s = clock()

    def _reload(self) -> None:
        try:
            info = self._path.stat()  # follows the symlinks a Kubernetes Secret volume uses
            stamp = (info.st_ino, info.st_size, info.st_mtime_ns)
            if stamp == self._stamp:
                return
            if info.st_size > MAX_TOKEN_FILE_BYTES:
                raise OSError(f"{info.st_size} bytes, more than {MAX_TOKEN_FILE_BYTES}")
            tokens = parse_tokens(self._path.read_text())
        except (OSError, UnicodeDecodeError) as exc:
            if not self._unreadable:  # once per outage, not once per look
                logger.error("token file %s unreadable (%s): refusing every request", self._path, exc)
            self._tokens, self._stamp, self._unreadable = [], None, True
            return
        self._unreadable = False
        if not tokens:
            logger.error("token file %s holds no token: refusing every request", self._path)
        else:
            logger.info("token file %s read: %d token(s)", self._path, len(tokens))
        self._tokens, self._stamp = tokens, stamp

    def tokens(self) -> list[bytes]:
        """The valid tokens now (the file is looked at again after ``reload_interval_s``)."""
        now_s = self._clock()
        if now_s - self._checked_s >= self._reload_interval_s:
            with self._lock:
                self._reload()
                self._checked_s = now_s
        return self._tokens

    def refusal(self, header: str | None, protocol: str) -> str | None:
        """None when ``header`` carries a valid token; else the reason (counted, never the token)."""
        token, why = credential(header)
        if token is not None and not matches(token, self.tokens()):
            why = WRONG
        if why is not None and self._on_refusal is not None:
            self._on_refusal(protocol, why)
        return why


def is_open_path(path: str) -> bool:
    return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)


def _app_path(scope) -> str:
    """The request's path inside the app (an app under a route prefix sees it in ``root_path``)."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    if root and path.startswith(root):
        return path[len(root) :] or "/"
    return path


def grpc_authorization(invocation_metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The ``authorization`` value of a call's metadata (gRPC keys are lower case)."""
    for key, value in invocation_metadata or ():
        if key == "authorization":
            return value.decode("latin-1") if isinstance(value, bytes) else value
    return None


_installed: TokenAuth | None = None  # the replica's checker (one replica per process)


def install(auth: TokenAuth | None) -> None:
    """Make ``auth`` the checker of this process's HTTP requests (None: auth off).

    A process-wide slot, because Serve runs a copy of the FastAPI app (pickled when the class is
    decorated, before any replica exists) that the replica cannot reach through its own objects.
    """
    global _installed
    _installed = auth


def installed() -> TokenAuth | None:
    return _installed


class BearerTokenMiddleware:
    """ASGI middleware: every HTTP request outside the open paths needs a valid token."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        auth = _installed
        if scope["type"] != "http" or auth is None or is_open_path(_app_path(scope)):
            await self.app(scope, receive, send)
            return
        header = None
        for key, value in scope.get("headers", ()):
            if key == b"authorization":
                header = value.decode("latin-1")
                break
        why = auth.refusal(header, "rest")
        if why is None:
            await self.app(scope, receive, send)
            return
        from ray_app.rest_bodies import error_json

        body = error_json(MESSAGES[why]).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"www-authenticate", b'Bearer realm="mnist"'),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
