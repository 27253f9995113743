"""The app's metrics as Prometheus scrapes them: Ray's metrics endpoint on this test's node."""

from __future__ import annotations

import re
import time
import urllib.request
from collections.abc import Callable


def scrape() -> str:
    """Ray's Prometheus text on the first live node (the app's own metrics carry a ``ray_`` prefix)."""
    import ray

    node = next(n for n in ray.nodes() if n["Alive"])
    url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
    with urllib.request.urlopen(url, timeout=30) as answer:
        return answer.read().decode()


def samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """(labels, value) of every sample of metric ``name`` in Prometheus' text format."""
    found = []
    for line in text.splitlines():
        match = re.match(rf"^{re.escape(name)}\{{(.*)\}} (\S+)$", line)
        if match:
            labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match.group(1)))
            found.append((labels, float(match.group(2))))
    return found


def scrape_until(wanted: Callable[[str], bool], timeout_s: float = 60.0) -> str:
    """Scrape until ``wanted`` holds (Ray exports custom metrics every few seconds); the last text."""
    deadline, text = time.monotonic() + timeout_s, ""
    while time.monotonic() < deadline:
        text = scrape()
        if wanted(text):
            return text
        time.sleep(1.0)
    return text
