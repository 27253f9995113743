"""The web page's server side (``ray_app.web``): static files, the page, the versions panel's JSON."""

from __future__ import annotations

import collections
import json
import random
import re
from pathlib import Path

import pytest

from ray_app import web
from ray_app.config import AppConfig, LiveConfig
from ray_app.predictor import Predictor
from ray_app.protocol.status import NotFoundError

pytestmark = pytest.mark.usefixtures("replica_context")  # reconfigure() sets Serve's batch limits

STATIC = Path(web.__file__).parent / "static"


# -- static files ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "content_type"),
    [
        ("app.js", "text/javascript; charset=utf-8"),
        ("style.css", "text/css; charset=utf-8"),
    ],
)
def test_static_files_with_type_etag_and_revalidation(name, content_type) -> None:
    response = web.static_response(name)
    assert response.status_code == 200 and response.body == (STATIC / name).read_bytes()
    assert response.headers["content-type"] == content_type
    assert response.headers["cache-control"] == "no-cache"
    assert response.headers["x-content-type-options"] == "nosniff"
    etag = response.headers["etag"]
    assert re.fullmatch(r'"[0-9a-f]{32}"', etag)
    unchanged = web.static_response(name, f'"other", {etag}')
    assert unchanged.status_code == 304 and unchanged.body == b"" and unchanged.headers["etag"] == etag
    assert web.static_response(name, '"stale"').status_code == 200


@pytest.mark.parametrize(
    "name",
    [
        "../web.py",
        "..",
        ".",
        "",
        "web.py",
        "../../pyproject.toml",
        "/etc/passwd",
        "%2e%2e%2fweb.py",
        "..\\web.py",
        "APP.JS",
        "app.js/",
        "index.html",  # the page itself only at /, with its base path filled in
    ],
)
def test_anything_but_a_shipped_file_is_404(name) -> None:
    response = web.static_response(name)
    assert response.status_code == 404 and response.body == b"not found"


def test_every_shipped_file_is_served_and_nothing_is_fetched_from_elsewhere() -> None:
    shipped = sorted(p.name for p in STATIC.iterdir())
    assert shipped == ["app.js", "index.html", "style.css"]
    for name in shipped:
        text = (STATIC / name).read_text()
        # no CDN, no web fonts, no remote images: every URL in the page is relative
        assert not re.search(r"(?:https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text, re.I), name
        assert "@import" not in text and "import(" not in text


# -- the page ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("root_path", "base"),
    [("", "/"), ("/", "/"), ("/mnist", "/mnist/"), ("/a/b/", "/a/b/"), ('/x"y<z', "/x&quot;y&lt;z/")],
)
def test_page_knows_its_base_path_and_model(root_path, base) -> None:
    response = web.page_response(root_path, "digits")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    page = response.body.decode()
    assert f'<base href="{base}">' in page
    assert 'data-model="digits"' in page and "POST v1/models/digits:predict" in page
    assert "$" not in page  # every placeholder filled
    assert 'src="static/app.js"' in page and 'href="static/style.css"' in page


def test_page_headers_forbid_other_origins_and_revalidate() -> None:
    response = web.page_response("", "mnist")
    policy = response.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "script-src 'self'" in policy and "connect-src 'self'" in policy
    assert response.headers["cache-control"] == "no-cache"
    assert web.page_response("", "mnist", response.headers["etag"]).status_code == 304
    assert web.page_response("/other", "mnist", response.headers["etag"]).status_code == 200


# -- the versions panel ------------------------------------------------------------------------
class _LoadedVersions:
    """What the panel uses of a backend: the versions that answer now."""

    kind = "stand-in"

    def __init__(self, versions: list[int]) -> None:
        self.loaded = versions

    def versions(self) -> list[int]:
        return list(self.loaded)

    def set_pinned_versions(self, versions) -> None:
        pass


def _predictor(store: Path, loaded: list[int], seed: int = 0, **live) -> Predictor:
    predictor = Predictor(
        AppConfig(model_base_path=str(store)), _LoadedVersions(loaded), rng=random.Random(seed)
    )
    predictor.reconfigure(LiveConfig(**live))
    return predictor


def _publish_metrics(store: Path, version: int, metrics: dict | str) -> None:
    extra = store / str(version) / "assets.extra"
    extra.mkdir(parents=True)
    text = metrics if isinstance(metrics, str) else json.dumps(metrics)
    (extra / "metrics.json").write_text(text)


FULL_METRICS = {
    "test_accuracy": 0.9931,
    "test_examples": 10000,
    "epochs": 3,
    "workers": 2,
    "batch_size_per_worker": 128,
    "train_examples": 60000,
    "train_wall_s": 90.8,
    "created_at": "2026-11-25T02:24:01+00:00",
    "architecture": "cnn-v1",
    "git_commit": "8d77e70",
    "data_source": "/home/someone/data/mnist",  # server paths stay off the page
    "init_from": "/mnt/models/mnist/1",
    "seed": 0,
}


def test_summary_lists_versions_with_their_published_metrics(tmp_path) -> None:
    _publish_metrics(tmp_path, 1, FULL_METRICS)
    _publish_metrics(tmp_path, 2, {"test_accuracy": 0.98, "epochs": 1})
    summary = web.models_summary(_predictor(tmp_path, [1, 2]), "mnist")
    assert summary == {
        "model": "mnist",
        "versions": [
            {
                "version": 1,
                "labels": [],
                "traffic_percent": 0.0,
                "metrics": {k: v for k, v in FULL_METRICS.items() if k in web.PANEL_METRICS},
            },
            {
                "version": 2,
                "labels": [],
                "traffic_percent": 100.0,
                "metrics": {"test_accuracy": 0.98, "epochs": 1},
            },
        ],
        "latest": 2,
        "version_labels": {},
        "canary_traffic_percent": 0.0,
    }
    assert set(summary["versions"][0]["metrics"]) == set(web.PANEL_METRICS)
    json.dumps(summary)  # what the route returns must be JSON


def test_summary_shows_labels_and_canary_share(tmp_path) -> None:
    predictor = _predictor(
        tmp_path, [1, 2, 3], version_labels={"stable": 1, "canary": 3, "old": 1}, canary_traffic_percent=25
    )
    summary = web.models_summary(predictor, "mnist")
    by_version = {v["version"]: v for v in summary["versions"]}
    assert [by_version[v]["labels"] for v in (1, 2, 3)] == [["old", "stable"], [], ["canary"]]
    assert [by_version[v]["traffic_percent"] for v in (1, 2, 3)] == [75.0, 0.0, 25.0]
    assert summary["version_labels"] == {"stable": 1, "canary": 3, "old": 1}
    assert summary["canary_traffic_percent"] == 25.0
    assert [v["metrics"] for v in summary["versions"]] == [{}, {}, {}]  # no metrics.json: nothing to show


@pytest.mark.parametrize(
    ("loaded", "live"),
    [
        ([1, 2], {}),
        ([1, 2, 3], {"version_labels": {"stable": 2}}),
        ([1, 2, 3], {"version_labels": {"stable": 1, "canary": 3}, "canary_traffic_percent": 30}),
        ([1, 2], {"version_labels": {"stable": 5, "canary": 1}, "canary_traffic_percent": 40}),  # stable gone
        ([1, 2], {"version_labels": {"stable": 1, "canary": 7}, "canary_traffic_percent": 40}),  # canary gone
        ([2], {"version_labels": {"stable": 2, "canary": 2}, "canary_traffic_percent": 50}),
    ],
)
def test_traffic_shares_match_the_predictors_routing(tmp_path, loaded, live) -> None:
    predictor = _predictor(tmp_path, loaded, seed=7, **live)
    shown = {v["version"]: v["traffic_percent"] for v in web.models_summary(predictor, "mnist")["versions"]}
    assert sum(shown.values()) == pytest.approx(100.0)
    draws = 4000
    routed = collections.Counter(predictor.resolve_version(None, None)[0] for _ in range(draws))
    for version in loaded:
        assert 100 * routed[version] / draws == pytest.approx(shown[version], abs=3.0), (version, routed)


def test_unreadable_metrics_do_not_break_the_panel(tmp_path) -> None:
    _publish_metrics(tmp_path, 4, "{not json")
    (version,) = web.models_summary(_predictor(tmp_path, [4]), "mnist")["versions"]
    assert version["version"] == 4 and version["metrics"] is None


def test_no_version_loaded_yet(tmp_path) -> None:
    summary = web.models_summary(_predictor(tmp_path, []), "mnist")
    assert summary["versions"] == [] and summary["latest"] is None


def test_unknown_model_is_not_found(tmp_path) -> None:
    with pytest.raises(NotFoundError, match="other"):  # the predictor's own message
        web.models_summary(_predictor(tmp_path, [1]), "other")
