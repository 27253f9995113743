"""Every target evaluated through Prometheus's HTTP API, the Markdown report and the plot."""

from __future__ import annotations

import math
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.dashboard.common import (
    DASHBOARD,
    MODEL_NAME,
    PLOT_TITLE,
    REPO,
    RPC_TIMEOUT_S,
    SCRAPE_INTERVAL_S,
    SD_FILE,
    SETTLE_S,
)
from bench.dashboard.prometheus import Prometheus
from bench.dashboard.queries import Target, expand, legend
from bench.dashboard.traffic import KINDS


@dataclass
class Evaluation:
    target: Target
    query: str
    at_s: float  # instant query time
    instant: list[dict[str, Any]]
    instant_all: int  # series with $application = .* (Grafana's "All")
    series: list[dict[str, Any]]  # range query over the run
    error: str | None = None
    excused: str | None = None  # why an empty result is expected in this run

    @property
    def points(self) -> int:
        return sum(1 for s in self.series for _, v in s["values"] if _finite(v))

    @property
    def status(self) -> str:
        if self.error:
            return "query error"
        if not self.series:
            return "no series"
        if not self.points:
            return "NaN only"
        return "ok"


def _finite(value: str) -> bool:
    return math.isfinite(float(value))


def evaluate(
    server: Prometheus,
    targets: list[Target],
    window: tuple[float, float],
    phase_end: Callable[[Target], float],
) -> list[Evaluation]:
    """Every target: instant at its phase's end (``mnist`` and All), range over ``window``."""
    results = []
    for target in targets:
        query, at_s = expand(target.expr, MODEL_NAME), phase_end(target)
        try:
            instant = server.query(query, at_s)
            instant_all = len(server.query(expand(target.expr, ".*"), at_s))
            series = server.query_range(query, *window, SCRAPE_INTERVAL_S)
            results.append(Evaluation(target, query, at_s, instant, instant_all, series))
        except RuntimeError as exc:
            results.append(Evaluation(target, query, at_s, [], 0, [], error=str(exc)))
    return results


def _fmt(value: float) -> str:
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"


def _series_summary(evaluation: Evaluation, limit: int = 6) -> str:
    """Per series: its legend and labels, the instant value, and Grafana's legend figures over the
    run (last non-null, max)."""
    at_end = {tuple(sorted(r["metric"].items())): float(r["value"][1]) for r in evaluation.instant}
    parts = []
    for series in evaluation.series[:limit]:
        values = [float(v) for _, v in series["values"] if _finite(v)]
        labels = series["metric"]
        raw = ", ".join(f'{k}="{v}"' for k, v in sorted(labels.items())) or "no labels"
        instant = at_end.get(tuple(sorted(labels.items())))
        shown = "at the end " + ("-" if instant is None else _fmt(instant))
        shown += f"; run: last {_fmt(values[-1])}, max {_fmt(max(values))}" if values else "; run: NaN only"
        parts.append(f"**{legend(evaluation.target.legend, labels)}** `{{{raw}}}`: {shown}")
    if len(evaluation.series) > limit:
        parts.append(f"... {len(evaluation.series) - limit} more")
    return "<br>".join(parts) or "-"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def markdown(report: dict[str, Any], evaluations: list[Evaluation]) -> str:
    """The results page."""
    lines = [
        "# The Grafana dashboard, checked against real metrics",
        "",
        f"`{DASHBOARD.relative_to(REPO)}`: every target of every panel, evaluated by Prometheus "
        f"{report['prometheus_version']} over the metrics of a real run of the app "
        f"(`python -m bench.dashboard_check`, {report['started']}). Grafana itself is not installed "
        "here: this is what its panels would be given.",
        "",
        "## The run",
        "",
        f"- Ray {report['ray_version']} local (`ray.init`, 2 CPUs), front door "
        f"`{report['front_door']}`, metrics export port {report['metrics_export_port']}; "
        f"`serve_configs/local.yaml` deployed through Serve's REST API (free ports; model store "
        f"with version 1: {report['model']}); ready after {report['ready_s']:.0f} s.",
        f"- Prometheus scraped every {SCRAPE_INTERVAL_S} s what Ray's `{SD_FILE}` lists "
        f"(`file_sd_configs`): {', '.join(report['scrape_targets'])}.",
        f"- Traffic: {report['traffic_s']:.0f} s at ~{report['rate_rps']:g} requests/s, 3 gRPC + 1 REST "
        f"workers, {report['images_per_request']} images per good request, a {RPC_TIMEOUT_S:g} s "
        "deadline on each. Events (seconds after the traffic started):",
    ]
    for event in report["events"]:
        lines.append(f"  - t={event['time'] - report['traffic_start']:.0f} s: {event['name']}")
    lines.append(f"- Training: {report['training']}.")
    lines.append(
        f"- `$application`: Grafana's variable query `label_values(ray_mnist_requests_total, application)` "
        f'gives {report["applications"]}; the table uses `mnist`, and checks `.*` ("All") too.'
    )
    lines += [
        "",
        "What the clients saw (request kind, status: count; every kind got the status it should: "
        f"{'yes' if not report['unexpected'] else 'no, see ' + ', '.join(report['unexpected'])}):",
        "",
        "| request | expected | got |",
        "|---|---|---|",
    ]
    by_kind: dict[str, list[str]] = {}
    for (kind, code), count in sorted(report["outcomes"].items()):
        by_kind.setdefault(kind, []).append(f"{code} {count}")
    for kind, got in by_kind.items():
        lines.append(f"| {kind} | {KINDS[kind].expected} | {', '.join(got)} |")
    ok = sum(e.status == "ok" for e in evaluations)
    lines += [
        "",
        "## Every query",
        "",
        f"{ok} of {len(evaluations)} targets returned data. At the end: `/api/v1/query` at the end of "
        f"the phase that exercises the panel ({SETTLE_S} s after the traffic stopped; for the training "
        "panel, when the training run returned), with `$application` = `mnist` and `.*`. Over the run: "
        "`/api/v1/query_range` from the start of the traffic to the end of the check, "
        f"step {SCRAPE_INTERVAL_S} s, each series as Grafana's legend shows it (last non-null, max), "
        "with its labels. A rate's last value over the run is 0: the training run came after the traffic.",
        "",
        "| panel | ref | query | status | series at the end (mnist / All) | each series: legend `{labels}`: value at the end; over the run: last, max |",
        "|---|---|---|---|---|---|",
    ]
    for e in evaluations:
        status = e.status if not e.excused or e.status == "ok" else f"{e.status} (not exercised: {e.excused})"
        if e.error:
            status += f": {e.error[:200]}"
        lines.append(
            f"| {e.target.panel_id}. {_cell(e.target.panel)} | {e.target.ref_id} | `{_cell(e.query)}` | "
            f"{_cell(status)} | {len(e.instant)} / {e.instant_all} | {_cell(_series_summary(e))} |"
        )
    if report.get("png"):
        lines += ["", f"Plot of the range queries: `{report['png']}` ({PLOT_TITLE})."]
    lines += ["", f"Left running afterwards: {report['left_running'] or 'nothing'}.", ""]
    return "\n".join(lines)


def plot(evaluations: list[Evaluation], report: dict[str, Any], path: Path) -> None:
    """One PNG: a subplot per panel, a line per series, the run's events as vertical lines."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError("plotting needs matplotlib: pip install -e '.[bench]' (or --no-plot)") from exc
    panels: dict[int, list[Evaluation]] = {}
    for e in evaluations:
        panels.setdefault(e.target.panel_id, []).append(e)
    columns = 2
    rows = math.ceil(len(panels) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(16, 3.4 * rows), squeeze=False)
    zero = report["traffic_start"]
    for ax, (_, group) in zip(axes.flat, panels.items()):
        plotted = False
        for e in group:
            for series in e.series:
                points = [(float(t) - zero, float(v)) for t, v in series["values"]]
                ax.plot(
                    *zip(*points), label=f"{e.target.ref_id}: {legend(e.target.legend, series['metric'])}"
                )
                plotted = True
        for event in report["events"]:
            ax.axvline(event["time"] - zero, color="grey", linestyle=":", linewidth=1)
        ax.set_title(f"{group[0].target.panel_id}. {group[0].target.panel}", fontsize=10)
        ax.set_xlabel("s after the traffic started", fontsize=8)
        ax.tick_params(labelsize=8)
        if plotted:
            ax.legend(fontsize=7, loc="upper left")
        else:
            ax.text(0.5, 0.5, "no data in this run", ha="center", va="center", transform=ax.transAxes)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    events = "; ".join(f"{e['time'] - zero:.0f} s: {e['name']}" for e in report["events"])
    subtitle = textwrap.fill(f"{DASHBOARD.name}, {report['started']}. Dotted lines: {events}", 150)
    figure.suptitle(f"{PLOT_TITLE}\n{subtitle}", fontsize=10)
    figure.tight_layout(rect=(0, 0, 1, 0.96))
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=90)
    plt.close(figure)
