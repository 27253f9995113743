"""serve_configs/autoscaling.yaml: local.yaml with Serve's autoscaling instead of two fixed
replicas, nothing else changed; a config Serve accepts, whose numbers can scale on 2 CPUs."""

from pathlib import Path

import yaml
from ray.serve.config import AutoscalingConfig
from ray.serve.schema import ServeDeploySchema

CONFIGS = Path(__file__).resolve().parents[2] / "serve_configs"


def _load(name: str) -> dict:
    return yaml.safe_load((CONFIGS / name).read_text())


def _deployment(config: dict) -> dict:
    return config["applications"][0]["deployments"][0]


def test_it_is_local_yaml_with_autoscaling_instead_of_a_replica_count():
    local, scaling = _load("local.yaml"), _load("autoscaling.yaml")
    autoscaling = _deployment(scaling).pop("autoscaling_config")
    assert "num_replicas" not in _deployment(scaling)
    _deployment(local).pop("num_replicas")
    assert scaling == local
    assert (autoscaling["min_replicas"], autoscaling["max_replicas"]) == (1, 2)


def test_serve_accepts_it_and_it_can_scale_here():
    config = _load("autoscaling.yaml")
    ServeDeploySchema.model_validate(config)
    deployment = _deployment(config)
    scaling = AutoscalingConfig.model_validate(deployment["autoscaling_config"])
    # Only requests holding a slot count: the target must be reachable below max_ongoing_requests.
    assert scaling.target_ongoing_requests < deployment["max_ongoing_requests"]
    # Both replicas fit a 2-CPU node.
    assert scaling.max_replicas * deployment["ray_actor_options"]["num_cpus"] <= 2
