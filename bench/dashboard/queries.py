"""The Grafana dashboard's targets: read from its JSON, variables expanded, legends rendered as
Grafana renders them."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from bench.dashboard.common import RATE_INTERVAL


@dataclass(frozen=True)
class Target:
    """One query of one panel."""

    panel_id: int
    panel: str
    ref_id: str
    expr: str
    legend: str

    @property
    def training(self) -> bool:
        return "mnist_train_" in self.expr


def dashboard_targets(dashboard: dict[str, Any]) -> list[Target]:
    """Every target of every panel (rows' nested panels included), in dashboard order."""
    panels = []
    for panel in dashboard["panels"]:
        panels += [panel, *panel.get("panels", [])]
    return [
        Target(
            panel["id"],
            panel["title"],
            target.get("refId", "?"),
            target["expr"],
            target.get("legendFormat", ""),
        )
        for panel in panels
        for target in panel.get("targets", [])
        if target.get("expr")
    ]


def expand(expr: str, application: str) -> str:
    """The query Grafana would send: template variables replaced by values."""
    for name, value in (
        ("$__rate_interval", RATE_INTERVAL),
        ("${application}", application),
        ("$application", application),
    ):
        expr = expr.replace(name, value)
    return expr


def legend(template: str, labels: dict[str, str]) -> str:
    """Grafana's legendFormat: ``{{label}}`` replaced by the series' label value."""
    text = re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), template)
    return text or "{" + ", ".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"
