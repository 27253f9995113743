"""bench/dashboard_check.py's pure parts (bench/dashboard/): reading the dashboard, expanding its variables, Grafana's
legends, the Prometheus config it writes (the script itself needs Ray and Prometheus: run it)."""

from __future__ import annotations

import json

import yaml

from bench.dashboard import common, prometheus, queries


def test_every_target_of_every_panel_is_read() -> None:
    dashboard = json.loads(common.DASHBOARD.read_text())
    targets = queries.dashboard_targets(dashboard)
    assert len(targets) == sum(len(p["targets"]) for p in dashboard["panels"])
    assert {t.panel_id for t in targets} == {p["id"] for p in dashboard["panels"]}
    assert any(t.training for t in targets)


def test_nested_row_panels_are_read() -> None:
    row = {
        "id": 1,
        "title": "row",
        "panels": [{"id": 2, "title": "p", "targets": [{"refId": "A", "expr": "up"}]}],
    }
    (target,) = queries.dashboard_targets({"panels": [row]})
    assert (target.panel_id, target.ref_id, target.expr, target.legend) == (2, "A", "up", "")


def test_variables_are_expanded_as_grafana_does() -> None:
    expr = 'rate(x{application=~"$application"}[$__rate_interval]) + y{a=~"${application}"}'
    assert (
        queries.expand(expr, "mnist")
        == f'rate(x{{application=~"mnist"}}[{common.RATE_INTERVAL}]) + y{{a=~"mnist"}}'
    )


def test_legend_format() -> None:
    assert (
        queries.legend("version {{version}} {{ state }}", {"version": "2", "state": "END"}) == "version 2 END"
    )
    assert queries.legend("", {"b": "2", "a": "1"}) == '{a="1", b="2"}'


def test_prometheus_scrapes_rays_service_discovery_file(tmp_path) -> None:
    config = yaml.safe_load(prometheus.prometheus_config(tmp_path / common.SD_FILE))
    assert config["global"]["scrape_interval"] == f"{common.SCRAPE_INTERVAL_S}s"
    (job,) = config["scrape_configs"]
    assert job["file_sd_configs"][0]["files"] == [str(tmp_path / "prom_metrics_service_discovery.json")]
