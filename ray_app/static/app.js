// The MNIST page: draw or drop a digit, ask the REST API, show the answer and the versions.
//
// Predictions use TF Serving's REST API like any client:
//   drawing:  POST v1/models/<model>:predict  {"signature_name": "predict_image_bytes",
//                                              "instances": [{"b64": "<PNG>"}]}
//   a file:   POST v1/models/<model>:predict  multipart/form-data with the file as "image"
// (or .../versions/<n>:predict, .../labels/<label>:predict). The answer is
// {"predictions": [{"probabilities": [10 numbers], "classes": digit}]}; the version that
// answered is in the X-Model-Version header. The versions panel polls GET api/models/<model>.
"use strict";

(() => {
  const POLL_INTERVAL_MS = 2000;
  const STROKE_WIDTH = 20; // on the 280 px pad: about MNIST's stroke on its 28 px grid
  const model = document.body.dataset.model;
  const $ = (id) => document.getElementById(id);
  const pad = $("pad");
  const ink = pad.getContext("2d");
  const state = {
    drawing: null, // pointerId of the stroke in progress
    last: null,
    inked: false,
    request: 0, // sequence number: only the newest answer is shown
    known: null, // versions seen by the first poll; later ones are marked "new"
    lastAnswered: null,
  };

  // -- the pad ---------------------------------------------------------------------------------
  function clearPad() {
    ink.fillStyle = "#000";
    ink.fillRect(0, 0, pad.width, pad.height);
    state.inked = false;
  }

  function point(event) {
    const box = pad.getBoundingClientRect();
    return {
      x: ((event.clientX - box.left) * pad.width) / box.width,
      y: ((event.clientY - box.top) * pad.height) / box.height,
    };
  }

  function stroke(from, to) {
    ink.strokeStyle = "#fff";
    ink.lineWidth = STROKE_WIDTH;
    ink.lineCap = "round";
    ink.lineJoin = "round";
    ink.beginPath();
    ink.moveTo(from.x, from.y);
    ink.lineTo(to.x, to.y);
    ink.stroke();
    state.inked = true;
  }

  pad.addEventListener("pointerdown", (event) => {
    event.preventDefault();
    pad.setPointerCapture(event.pointerId);
    state.drawing = event.pointerId;
    state.last = point(event);
    stroke(state.last, state.last);
  });
  pad.addEventListener("pointermove", (event) => {
    if (state.drawing !== event.pointerId) return;
    const events = event.getCoalescedEvents ? event.getCoalescedEvents() : [];
    for (const each of events.length ? events : [event]) {
      const next = point(each);
      stroke(state.last, next);
      state.last = next;
    }
  });
  for (const type of ["pointerup", "pointercancel"]) {
    pad.addEventListener(type, (event) => {
      if (state.drawing !== event.pointerId) return;
      state.drawing = null;
      if (type === "pointerup" && $("auto").checked) predictDrawing();
    });
  }

  // -- asking the REST API ---------------------------------------------------------------------
  function predictPath() {
    const base = `v1/models/${encodeURIComponent(model)}`;
    const [kind, value] = $("target").value.split(":");
    if (kind === "version") return `${base}/versions/${encodeURIComponent(value)}:predict`;
    if (kind === "label") return `${base}/labels/${encodeURIComponent(value)}:predict`;
    return `${base}:predict`;
  }

  function setStatus(text, isError = false) {
    $("status").textContent = text;
    $("status").classList.toggle("error", isError);
  }

  // The bearer token (docs/security.md): typed once, kept in this tab's sessionStorage only.
  const TOKEN_KEY = "mnist-token";

  function authHeaders() {
    const token = $("token").value.trim();
    return token ? { Authorization: `Bearer ${token}` } : {};
  }

  async function ask(init) {
    const sequence = ++state.request;
    const started = performance.now();
    setStatus("Predicting…");
    let response;
    let body;
    try {
      const headers = { ...authHeaders(), ...(init.headers || {}) };
      response = await fetch(predictPath(), { method: "POST", cache: "no-store", ...init, headers });
      body = await response.json().catch(() => ({})); // a proxy's error page is not JSON
    } catch (error) {
      if (sequence === state.request) setStatus(`The server did not answer: ${error.message}`, true);
      return;
    }
    if (sequence !== state.request) return; // a newer request was sent meanwhile
    if (!response.ok) {
      setStatus(`Error ${response.status}: ${body.error || response.statusText || "no details"}`, true);
      return;
    }
    const version = response.headers.get("X-Model-Version");
    showAnswer(body.predictions[0], version);
    setStatus(`Answered in ${Math.round(performance.now() - started)} ms by version ${version}.`);
  }

  function predictDrawing() {
    if (!state.inked) {
      setStatus("Draw a digit first (or drop an image).", true);
      return;
    }
    const png = pad.toDataURL("image/png").split(",", 2)[1];
    ask({
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ signature_name: "predict_image_bytes", instances: [{ b64: png }] }),
    });
  }

  function predictFile(file) {
    if (!file) return;
    showFile(file);
    const form = new FormData();
    form.append("image", file, file.name);
    ask({ body: form }); // the browser sets multipart/form-data with its boundary
  }

  function showFile(file) {
    const url = URL.createObjectURL(file);
    const image = new Image();
    image.onload = () => {
      clearPad();
      const scale = Math.min(pad.width / image.width, pad.height / image.height);
      const width = image.width * scale;
      const height = image.height * scale;
      ink.drawImage(image, (pad.width - width) / 2, (pad.height - height) / 2, width, height);
      state.inked = true;
      URL.revokeObjectURL(url);
    };
    image.onerror = () => URL.revokeObjectURL(url); // the server says what is wrong with it
    image.src = url;
  }

  // -- the answer ------------------------------------------------------------------------------
  function showAnswer(prediction, version) {
    const probabilities = prediction.probabilities;
    const digit = prediction.classes;
    $("digit").textContent = String(digit);
    $("confidence").textContent = `${(100 * probabilities[digit]).toFixed(1)} % sure`;
    $("answered-by").textContent = `answered by version ${version}`;
    const bars = $("bars");
    bars.replaceChildren(
      ...probabilities.map((p, d) => {
        const bar = document.createElement("div");
        bar.className = d === digit ? "bar top" : "bar";
        bar.dataset.digit = String(d);
        bar.title = `${d}: ${(100 * p).toFixed(2)} %`;
        const value = document.createElement("span");
        value.className = "value";
        value.textContent = p >= 0.01 ? `${Math.round(100 * p)}%` : "";
        const fill = document.createElement("div");
        fill.className = "fill";
        fill.style.height = `${(100 * p).toFixed(1)}%`;
        const label = document.createElement("span");
        label.className = "label";
        label.textContent = String(d);
        bar.append(value, fill, label);
        return bar;
      }),
    );
    state.lastAnswered = version;
    markAnswered();
  }

  // -- the versions panel ----------------------------------------------------------------------
  function cell(...content) {
    const td = document.createElement("td");
    td.append(...content);
    return td;
  }

  function tag(text, className = "tag") {
    const span = document.createElement("span");
    span.className = className;
    span.textContent = text;
    return span;
  }

  function trained(metrics) {
    if (!metrics.created_at) return "—";
    const when = new Date(metrics.created_at);
    const text = Number.isNaN(when.getTime()) ? metrics.created_at : when.toLocaleString();
    return metrics.train_wall_s ? `${text} (${metrics.train_wall_s} s)` : text;
  }

  function accuracy(metrics) {
    if (typeof metrics.test_accuracy !== "number") return "—";
    const on = metrics.test_examples ? ` (${metrics.test_examples} test images)` : "";
    return `${(100 * metrics.test_accuracy).toFixed(2)} %${on}`;
  }

  function renderVersions(summary) {
    const rows = summary.versions.map((entry) => {
      const metrics = entry.metrics || {};
      const row = document.createElement("tr");
      row.dataset.version = String(entry.version);
      const labels = entry.labels.map((label) => tag(label));
      if (state.known && !state.known.has(entry.version)) labels.push(tag("new", "tag new"));
      row.append(
        cell(String(entry.version)),
        cell(...labels),
        cell(`${entry.traffic_percent} %`),
        cell(entry.metrics === null ? "metrics.json unreadable" : accuracy(metrics)),
        cell(metrics.epochs === undefined ? "—" : String(metrics.epochs)),
        cell(metrics.workers === undefined ? "—" : String(metrics.workers)),
        cell(trained(metrics)),
      );
      return row;
    });
    $("versions").tBodies[0].replaceChildren(...rows);
    markAnswered();

    const shares = summary.versions
      .filter((entry) => entry.traffic_percent > 0)
      .map((entry) => `${entry.traffic_percent} % to version ${entry.version}`);
    const labels = Object.entries(summary.version_labels).map(([label, version]) => `${label} → ${version}`);
    $("routing").textContent =
      (shares.length ? `Requests without a version: ${shares.join(", ")}.` : "No version is loaded yet.") +
      (labels.length ? ` Labels: ${labels.join(", ")}.` : "") +
      ` Canary share: ${summary.canary_traffic_percent} %.`;

    const versions = summary.versions.map((entry) => entry.version);
    if (state.known === null) state.known = new Set(versions);
    const fresh = versions.filter((version) => !state.known.has(version));
    $("panel-status").textContent =
      (fresh.length ? `New since this page opened: version ${fresh.join(", ")}. ` : "") +
      `Updated ${new Date().toLocaleTimeString()}.`;
    renderTargets(summary);
  }

  function markAnswered() {
    for (const row of $("versions").tBodies[0].rows) {
      row.classList.toggle("answered", row.dataset.version === state.lastAnswered);
    }
  }

  function renderTargets(summary) {
    const select = $("target");
    const chosen = select.value;
    const options = [["", "default routing (labels, canary share)"]];
    for (const entry of summary.versions) options.push([`version:${entry.version}`, `version ${entry.version}`]);
    for (const label of Object.keys(summary.version_labels)) options.push([`label:${label}`, `label ${label}`]);
    select.replaceChildren(
      ...options.map(([value, text]) => {
        const option = document.createElement("option");
        option.value = value;
        option.textContent = text;
        return option;
      }),
    );
    select.value = options.some(([value]) => value === chosen) ? chosen : "";
  }

  async function poll() {
    try {
      const response = await fetch(`api/models/${encodeURIComponent(model)}`, {
        cache: "no-store",
        headers: authHeaders(),
      });
      const body = await response.json().catch(() => ({}));
      if (!response.ok) throw new Error(body.error || `HTTP ${response.status}`);
      renderVersions(body);
    } catch (error) {
      $("panel-status").textContent = `Cannot read the versions (${error.message}); retrying.`;
    } finally {
      setTimeout(poll, POLL_INTERVAL_MS);
    }
  }

  // -- wiring ----------------------------------------------------------------------------------
  $("predict").addEventListener("click", predictDrawing);
  $("clear").addEventListener("click", () => {
    clearPad();
    setStatus("");
  });
  $("file").addEventListener("change", (event) => {
    predictFile(event.target.files[0]);
    event.target.value = ""; // choosing the same file again fires again
  });
  const zone = $("drop-zone");
  for (const type of ["dragenter", "dragover"]) {
    zone.addEventListener(type, (event) => {
      event.preventDefault();
      zone.classList.add("over");
    });
  }
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("over");
    predictFile(event.dataTransfer.files[0]);
  });

  $("token").value = sessionStorage.getItem(TOKEN_KEY) || "";
  $("token").addEventListener("change", (event) => {
    sessionStorage.setItem(TOKEN_KEY, event.target.value.trim());
    setStatus("");
  });

  clearPad();
  poll();
})();
