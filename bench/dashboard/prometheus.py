"""``prometheus`` on a free port, scraping the targets Ray lists for it."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from bench.dashboard.cluster import Cluster
from bench.dashboard.common import HTTP_TIMEOUT_S, SCRAPE_INTERVAL_S, http_json, stop_process
from client.local.ports import free_port


def prometheus_config(sd_file: Path) -> str:
    """Scrape what Ray's service-discovery file lists, every SCRAPE_INTERVAL_S."""
    return yaml.safe_dump(
        {
            "global": {
                "scrape_interval": f"{SCRAPE_INTERVAL_S}s",
                "evaluation_interval": f"{SCRAPE_INTERVAL_S}s",
            },
            "scrape_configs": [
                {
                    "job_name": "ray",
                    "file_sd_configs": [
                        {"files": [str(sd_file)], "refresh_interval": f"{SCRAPE_INTERVAL_S}s"}
                    ],
                }
            ],
        },
        sort_keys=False,
    )


@dataclass
class Prometheus:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path

    def query(self, expr: str, at_s: float) -> list[dict[str, Any]]:
        """``/api/v1/query`` at ``at_s`` (unix seconds): the result vector."""
        params = urllib.parse.urlencode({"query": expr, "time": f"{at_s:.3f}"})
        return self._data(f"{self.url}/api/v1/query?{params}")["result"]

    def query_range(self, expr: str, start_s: float, end_s: float, step_s: float) -> list[dict[str, Any]]:
        """``/api/v1/query_range``: one matrix entry per series."""
        params = urllib.parse.urlencode(
            {"query": expr, "start": f"{start_s:.3f}", "end": f"{end_s:.3f}", "step": f"{step_s:g}"}
        )
        return self._data(f"{self.url}/api/v1/query_range?{params}")["result"]

    def label_values(self, label: str, metric: str) -> list[str]:
        """Grafana's ``label_values(metric, label)``."""
        params = urllib.parse.urlencode({"match[]": metric})
        return self._data(f"{self.url}/api/v1/label/{label}/values?{params}")

    def _data(self, url: str) -> Any:
        try:
            reply = http_json(url)
        except urllib.error.HTTPError as exc:  # a bad query: Prometheus says why in the body
            raise RuntimeError(f"{exc.code}: {exc.read().decode(errors='replace')[:300]}") from None
        if reply.get("status") != "success":
            raise RuntimeError(f"Prometheus: {reply}")
        return reply["data"]


@contextlib.contextmanager
def prometheus(sd_file: Path, workdir: Path) -> Iterator[Prometheus]:
    """The ``prometheus`` binary on a free port with its own storage; stopped on exit."""
    binary = shutil.which("prometheus")
    if binary is None:
        raise FileNotFoundError("prometheus")
    config = workdir / "prometheus.yml"
    config.write_text(prometheus_config(sd_file))
    port = free_port()
    log = workdir / "prometheus.log"
    cmd = [
        binary, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'prometheus-data'}",
        f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=1d",
    ]  # fmt: skip
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    server = Prometheus(f"http://127.0.0.1:{port}", proc, log)
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {proc.returncode}: {log.read_text()[-2000:]}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"{server.url}/-/ready", timeout=HTTP_TIMEOUT_S) as reply:
                    if reply.status == 200:
                        break
            if time.monotonic() > deadline:
                raise TimeoutError(f"prometheus not ready within 60 s: {log.read_text()[-2000:]}")
            time.sleep(0.5)
        print(f"prometheus: {server.url} (pid {proc.pid}), scraping what {sd_file.name} lists", flush=True)
        yield server
    finally:
        stop_process(proc)
        print(f"prometheus: stopped (exit {proc.returncode})", flush=True)


def wait_scraped(server: Prometheus, cluster: Cluster, deadline_s: float) -> list[str]:
    """Wait until Prometheus scrapes our metrics export port; returns the ``up`` targets."""
    started = time.monotonic()
    while time.monotonic() - started < deadline_s:
        up = server.query('up{job="ray"}', time.time())
        targets = [f"{r['metric'].get('instance')}={r['value'][1]}" for r in up]
        if any(t.endswith(f":{cluster.metrics_export_port}=1") for t in targets):
            return targets
        time.sleep(1.0)
    sd = cluster.sd_file.read_text() if cluster.sd_file.exists() else "(no file)"
    raise TimeoutError(f"Prometheus never scraped :{cluster.metrics_export_port}; {cluster.sd_file}: {sd}")
