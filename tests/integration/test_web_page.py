"""The web page and multipart uploads, on the real app deployed on a local Ray.

HTTP checks use urllib; the page itself runs in a real headless Chromium
(``tests/integration/browser.py``). Screenshots go to the test's tmp dir and, when
``MNIST_ARTIFACTS_DIR`` is set, are copied there.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import shlex
import shutil
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from urllib3.filepost import encode_multipart_formdata

from ray_app import model_store
from tests import doc_blocks
from tests.integration.browser import chromium, needs_browser, text, wait
from tests.integration.cluster import local_serve, run_local_app

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "data"
# Small limits, so that each one can be crossed with small requests.
LIMITS = {
    "max_request_bytes": 64 * 1024,
    "max_images_per_request": 4,
    "max_image_pixels": 4_000_000,
    "max_image_bytes": 16 * 1024,
}
LABELS = {"stable": 1, "canary": 2}
CANARY_PERCENT = 25.0


def _publish(export_dir: Path, store: Path, version: int) -> None:
    """Publish a copy of the export with a metrics.json measured on the SavedModel, as training does."""
    from training.data import load_mnist
    from training.export import evaluate_saved_model

    test = load_mnist().test.head(2000)
    with model_store.staging_dir(store) as staged:
        shutil.copytree(export_dir, staged, dirs_exist_ok=True)
        metrics = {
            "test_accuracy": evaluate_saved_model(staged, test.images, test.labels),
            "test_examples": len(test),
            "epochs": 1,
            "workers": 1,
            "train_examples": 12000,
            "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "data_source": str(REPO / "data" / "mnist"),  # must not reach the page
        }
        extra = staged / model_store.EXTRA_DIR
        extra.mkdir(exist_ok=True)
        (extra / model_store.METRICS_FILE).write_text(json.dumps(metrics))
        model_store.publish(staged, store, version)


@pytest.fixture(scope="module")
def app(tmp_path_factory, trained_export):
    """local.yaml's deployment on a free HTTP port: version 1, labels stable=1 and canary=2 (25 %)."""
    store = tmp_path_factory.mktemp("web-store") / "mnist"
    _publish(trained_export, store, 1)
    with local_serve() as ports:  # stopped and checked gone, also when the app fails to start
        run_local_app(
            store,
            user_config={
                "batch_wait_timeout_s": 0.005,
                "version_labels": LABELS,
                "canary_traffic_percent": CANARY_PERCENT,
            },
            args={"poll_interval_s": 0.5, "limits": LIMITS},
        )
        yield {"url": ports.http, "store": store, "export": trained_export}


def _http(app, path: str, data: bytes | None = None, headers: dict | None = None):
    """(status, headers, body bytes) of one request."""
    request = urllib.request.Request(app["url"] + path, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read()


def _upload(app, path: str, *files: tuple[str, bytes], field: str = "image"):
    body, content_type = encode_multipart_formdata(
        [(field, (name, data, "image/png")) for name, data in files]
    )
    status, headers, raw = _http(app, path, body, {"Content-Type": content_type})
    return status, headers, json.loads(raw)


def _b64_predict(app, path: str, png: bytes):
    body = {"signature_name": "predict_image_bytes", "instances": [{"b64": base64.b64encode(png).decode()}]}
    status, headers, raw = _http(app, path, json.dumps(body).encode(), {"Content-Type": "application/json"})
    return status, headers, json.loads(raw)


# -- multipart uploads --------------------------------------------------------------------------
def test_multipart_upload_answers_like_the_json_api(app):
    files = [(f"{d}.png", (DATA / f"{d}.png").read_bytes()) for d in (3, 5, 8)]
    status, headers, body = _upload(app, "/v1/models/mnist/versions/1:predict", *files)
    assert status == 200 and headers["X-Model-Version"] == "1"
    predictions = body["predictions"]
    assert len(predictions) == 3 and set(predictions[0]) == {"probabilities", "classes"}
    for (_, png), prediction in zip(files, predictions):
        assert len(prediction["probabilities"]) == 10
        assert sum(prediction["probabilities"]) == pytest.approx(1.0, abs=1e-4)
        _, _, same = _b64_predict(app, "/v1/models/mnist/versions/1:predict", png)
        assert prediction["classes"] == same["predictions"][0]["classes"]
        assert np.allclose(prediction["probabilities"], same["predictions"][0]["probabilities"], atol=1e-5)
    status, headers, body = _upload(app, "/v1/models/mnist/labels/stable:predict", files[0])
    assert status == 200 and headers["X-Model-Version"] == str(LABELS["stable"])
    status, headers, body = _upload(app, "/v1/models/mnist:predict", files[0])
    assert status == 200 and headers["X-Model-Version"] in {"1", "2"}


@pytest.mark.skipif(not shutil.which("curl"), reason="needs curl")
def test_the_readmes_curl_upload(app):
    """The tutorial's multipart example, with curl's own encoder, on this app's port."""
    (line,) = [
        line.split("#")[0].strip()
        for line in doc_blocks.doc_text().splitlines()
        if line.startswith("curl -s -F image=@")
    ]
    command = shlex.split(line.replace("localhost:8000", app["url"]))
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=60, check=True)
    predictions = json.loads(result.stdout)["predictions"]
    assert len(predictions) == line.count("-F image=@") == 2
    assert all(len(p["probabilities"]) == 10 and 0 <= p["classes"] <= 9 for p in predictions)


@pytest.mark.parametrize(
    ("files", "field", "path", "status", "message"),
    [
        ([("a.png", b"x")] * 5, "image", "/v1/models/mnist:predict", 429, "the limit is 4"),
        (
            [("big.png", b"x" * (16 * 1024 + 1))],
            "image",
            "/v1/models/mnist:predict",
            429,
            "the limit is 16384",
        ),
        ([("huge.png", b"x" * (64 * 1024))], "image", "/v1/models/mnist:predict", 429, "the limit is 65536"),
        ([("a.txt", b"not an image")], "image", "/v1/models/mnist:predict", 400, "image 0:"),
        ([("a.png", b"x")], "image", "/v1/models/other:predict", 404, "other"),
        ([("a.png", b"x")], "image", "/v1/models/mnist/versions/9:predict", 404, "9"),
    ],
)
def test_multipart_errors_have_statuses_and_messages(app, files, field, path, status, message):
    got, _, body = _upload(app, path, *files, field=field)
    assert got == status and message in body["error"], body
    assert "Traceback" not in body["error"]


def test_multipart_text_field_is_refused(app):
    body, content_type = encode_multipart_formdata([("image", "iVBORw0KGgo=")])
    status, _, raw = _http(app, "/v1/models/mnist:predict", body, {"Content-Type": content_type})
    assert status == 400 and "is not a file" in json.loads(raw)["error"]


# -- the page's server side ---------------------------------------------------------------------
def test_page_static_files_and_panel_json(app):
    status, headers, page = _http(app, "/")
    assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
    assert b'<base href="/">' in page and b'data-model="mnist"' in page
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    status, headers, script = _http(app, "/static/app.js")
    assert status == 200 and headers["Content-Type"] == "text/javascript; charset=utf-8"
    assert _http(app, "/static/app.js", headers={"If-None-Match": headers["ETag"]})[0] == 304
    for path in (
        "/static/..%2Fweb.py",
        "/static/%2e%2e/web.py",
        "/static/../deployment.py",
        "/static/nope.js",
    ):
        assert _http(app, path)[0] == 404, path
    status, _, raw = _http(app, "/api/models/mnist")
    summary = json.loads(raw)
    assert status == 200 and summary["model"] == "mnist"
    first = summary["versions"][0]
    assert first["version"] == 1 and first["labels"] == ["stable"]
    assert 0.8 < first["metrics"]["test_accuracy"] <= 1 and first["metrics"]["workers"] == 1
    assert "data_source" not in first["metrics"]
    assert summary["version_labels"] == LABELS and summary["canary_traffic_percent"] == CANARY_PERCENT
    status, _, raw = _http(app, "/api/models/other")
    assert status == 404 and "other" in json.loads(raw)["error"]


# -- the page in a real browser -----------------------------------------------------------------
@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    with chromium(tmp_path_factory.mktemp("chromium-profile")) as driver:
        yield driver


def _open(browser, app):
    browser.get(app["url"] + "/")
    wait(browser, lambda b: b.find_elements("css selector", "#versions tbody tr[data-version]"))


def _answer(browser) -> tuple[int, int, list[str]]:
    """(digit, version, bar labels) once the page shows an answer."""
    wait(browser, lambda b: text(b, "#status").startswith("Answered in"))
    digit = int(text(browser, "#digit"))
    version = int(text(browser, "#answered-by").removeprefix("answered by version "))
    bars = [bar.get_attribute("data-digit") for bar in browser.find_elements("css selector", "#bars .bar")]
    return digit, version, bars


def _stroke(browser, kind: str, points: list[tuple[int, int]]) -> None:
    """One stroke on the pad through points (offsets from its centre, in CSS pixels)."""
    from selenium.webdriver.common.actions.action_builder import ActionBuilder
    from selenium.webdriver.common.actions.pointer_input import PointerInput

    pad = browser.find_element("id", "pad")
    actions = ActionBuilder(browser, mouse=PointerInput(kind, kind), duration=15)  # ms per move
    x, y = points[0]
    actions.pointer_action.move_to(pad, x, y).pointer_down()
    for x, y in points[1:]:
        actions.pointer_action.move_to(pad, x, y)
    actions.pointer_action.pointer_up()
    actions.perform()


def _line(start: tuple[int, int], end: tuple[int, int], steps: int = 12) -> list[tuple[int, int]]:
    return [
        (round(start[0] + (end[0] - start[0]) * i / steps), round(start[1] + (end[1] - start[1]) * i / steps))
        for i in range(steps + 1)
    ]


def _screenshot(browser, tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    assert browser.save_screenshot(str(path))
    artifacts = os.environ.get("MNIST_ARTIFACTS_DIR")
    if artifacts:
        Path(artifacts).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(artifacts) / name)
    return path


def _no_console_errors(browser) -> None:
    errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert not errors, errors  # script errors, CSP violations, failed loads


def _canvas_png(browser) -> bytes:
    url = browser.execute_script("return document.getElementById('pad').toDataURL('image/png')")
    return base64.b64decode(url.split(",", 1)[1])


@needs_browser
def test_drawing_a_digit_shows_digit_bars_and_version(app, browser, tmp_path):
    from selenium.webdriver.common.actions import interaction

    _open(browser, app)
    _stroke(browser, interaction.POINTER_MOUSE, _line((-70, -90), (70, -90)))  # a 7: the bar (mouse)
    _stroke(browser, interaction.POINTER_TOUCH, _line((70, -90), (-10, 100)))  # and the stem (finger)
    browser.find_element("id", "predict").click()
    digit, version, bars = _answer(browser)
    assert bars == [str(d) for d in range(10)]
    assert browser.find_elements("css selector", "#bars .bar.top")[0].get_attribute("data-digit") == str(
        digit
    )
    # The page shows what the REST API answers for the drawing it sent.
    status, headers, body = _b64_predict(
        app, f"/v1/models/mnist/versions/{version}:predict", _canvas_png(browser)
    )
    assert status == 200 and body["predictions"][0]["classes"] == digit
    assert digit == 7, f"the drawn 7 was read as {digit}"
    row = browser.find_element("css selector", f"#versions tr[data-version='{version}']")
    assert "answered" in row.get_attribute("class")
    _screenshot(browser, tmp_path, "web-page-drawn.png")
    _no_console_errors(browser)


@needs_browser
def test_choosing_and_dropping_a_file(app, browser):
    _open(browser, app)
    chosen = DATA / "3.png"
    browser.find_element("id", "file").send_keys(str(chosen))
    digit, version, bars = _answer(browser)
    _, _, body = _upload(app, f"/v1/models/mnist/versions/{version}:predict", ("3.png", chosen.read_bytes()))
    assert len(bars) == 10 and digit == body["predictions"][0]["classes"]

    browser.find_element("id", "clear").click()
    dropped = (DATA / "5.png").read_bytes()
    browser.execute_script(
        """
        const bytes = Uint8Array.from(atob(arguments[0]), (c) => c.charCodeAt(0));
        const transfer = new DataTransfer();
        transfer.items.add(new File([bytes], "5.png", {type: "image/png"}));
        document.getElementById("drop-zone").dispatchEvent(
            new DragEvent("drop", {dataTransfer: transfer, bubbles: true, cancelable: true}));
        """,
        base64.b64encode(dropped).decode(),
    )
    digit, version, bars = _answer(browser)
    _, _, body = _upload(app, f"/v1/models/mnist/versions/{version}:predict", ("5.png", dropped))
    assert len(bars) == 10 and digit == body["predictions"][0]["classes"]
    _no_console_errors(browser)


@needs_browser
def test_panel_shows_a_new_version_its_labels_and_the_canary_share(app, browser, tmp_path):
    from selenium.webdriver.common.actions import interaction
    from selenium.webdriver.support.ui import Select

    _open(browser, app)
    if not (app["store"] / "2").exists():
        _publish(app["export"], app["store"], 2)
    wait(browser, lambda b: b.find_elements("css selector", "#versions tr[data-version='2']"))
    row = browser.find_element("css selector", "#versions tr[data-version='2']")
    assert "canary" in row.text and "new" in row.text and f"{CANARY_PERCENT:g} %" in row.text
    assert "%" in row.find_elements("css selector", "td")[3].text  # test accuracy from metrics.json
    stable = browser.find_element("css selector", "#versions tr[data-version='1']").text
    assert "stable" in stable and f"{100 - CANARY_PERCENT:g} %" in stable
    assert f"Canary share: {CANARY_PERCENT:g} %" in text(browser, "#routing")
    assert "New since this page opened: version 2" in text(browser, "#panel-status")

    Select(browser.find_element("id", "target")).select_by_value("version:2")
    browser.find_element("id", "auto").click()  # predict only on the button
    _stroke(browser, interaction.POINTER_PEN, [(-45, -100), (-60, 10), (60, 10)])  # a 4, with a pen
    _stroke(browser, interaction.POINTER_PEN, _line((25, -100), (25, 100)))
    browser.find_element("id", "predict").click()
    digit, version, bars = _answer(browser)
    assert version == 2 and len(bars) == 10 and 0 <= digit <= 9
    wait(
        browser,
        lambda b: "answered" in b.find_element("css selector", "tr[data-version='2']").get_attribute("class"),
    )
    shot = _screenshot(browser, tmp_path, "web-page.png")
    assert shot.stat().st_size > 10_000
    _no_console_errors(browser)


@needs_browser
def test_problems_are_shown_on_the_page(app, browser, tmp_path):
    _open(browser, app)
    browser.find_element("id", "predict").click()  # nothing drawn yet: no request
    assert text(browser, "#status") == "Draw a digit first (or drop an image)."
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("just text")
    browser.find_element("id", "file").send_keys(str(not_an_image))
    wait(browser, lambda b: text(b, "#status").startswith("Error 400: image 0:"))
    assert "error" in browser.find_element("id", "status").get_attribute("class")
    severe = [entry["message"] for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert len(severe) == 1 and "status of 400" in severe[0], severe  # only the refused upload
