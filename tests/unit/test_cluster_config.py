"""cluster.yaml (the AWS cluster), its image, serve_configs/gpu.yaml and the AWS guide's
walkthrough (docs/how-to/aws.md) agree with each other and with Ray's own schema (offline: no Ray, no AWS calls)."""

from __future__ import annotations

import copy
import re
import shlex
import tomllib
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from ray_app.config import AppConfig
from training import arguments

ROOT = Path(__file__).resolve().parents[2]
CLUSTER_YAML = ROOT / "cluster.yaml"
GPU_YAML = ROOT / "serve_configs" / "gpu.yaml"
EDGE_YAML = ROOT / "serve_configs" / "edge" / "cluster.yaml"
DOCKERFILE = ROOT / ".ci" / "docker" / "Dockerfile"
GUIDE = ROOT / "docs" / "how-to" / "aws.md"  # the AWS guide (the README's cluster section until issue 19)
GUIDE_SECTION = "## ray up → ray job submit → serve deploy → client"
STORE = "/mnt/models"


# ---------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def cluster() -> dict[str, Any]:
    return yaml.safe_load(CLUSTER_YAML.read_text())


@pytest.fixture(scope="module")
def gpu_app() -> dict[str, Any]:
    (app,) = yaml.safe_load(GPU_YAML.read_text())["applications"]
    return app


@pytest.fixture(scope="module")
def gpu_deployment(gpu_app) -> dict[str, Any]:
    (deployment,) = gpu_app["deployments"]
    return deployment


def _gpu_worker_types(cluster: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        name: node_type
        for name, node_type in cluster["available_node_types"].items()
        if name != cluster["head_node_type"] and node_type["resources"].get("GPU", 0) >= 1
    }


def _tokens(command: str) -> list[str]:
    """Shell words with operators ((, ), &&, ||, |, ;) as separate tokens; comments dropped."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    lexer.commenters = "#"
    return list(lexer)


def _nfs_mounts(commands: list[str]) -> dict[str, str]:
    """``mount -t nfs4 ... DEVICE TARGET`` in shell commands -> {target: device}."""
    mounts: dict[str, str] = {}
    for command in commands:
        words = _tokens(command)
        for i, word in enumerate(words):
            if word != "mount" or words[i + 1 : i + 3] != ["-t", "nfs4"]:
                continue
            positional: list[str] = []
            rest = iter(words[i + 3 :])
            for arg in rest:
                if arg in {")", "&&", "||", ";", "|"}:
                    break
                if arg == "-o":
                    next(rest)
                elif not arg.startswith("-"):
                    positional.append(arg)
            device, target = positional
            mounts[target] = device
    return mounts


def _docker_options(cluster: dict[str, Any], role: str) -> list[str]:
    docker = cluster["docker"]
    return [
        word
        for option in docker.get("run_options", []) + docker.get(f"{role}_run_options", [])
        for word in option.split()
    ]


def _bind_mounts(options: list[str]) -> dict[str, str]:
    """``-v SRC:DST`` docker options -> {DST: SRC}."""
    return {
        value.split(":")[1]: value.split(":")[0]
        for flag, value in zip(options, options[1:])
        if flag in {"-v", "--volume"}
    }


def _shared_mounts(cluster: dict[str, Any]) -> set[str]:
    """Container paths that are the same NFS file system on every node."""
    nfs_targets = set(_nfs_mounts(cluster["initialization_commands"]))
    shared = set()
    for role in ("head", "worker"):
        shared_here = {
            dst for dst, src in _bind_mounts(_docker_options(cluster, role)).items() if src in nfs_targets
        }
        shared = shared_here if role == "head" else shared & shared_here
    return shared


def _is_under(path: str, base: str) -> bool:
    return PurePosixPath(path).is_relative_to(PurePosixPath(base))


def _ray_start_commands(cluster: dict[str, Any]) -> dict[str, list[str]]:
    return {
        role: [c for c in cluster[f"{role}_start_ray_commands"] if "ray start" in c]
        for role in ("head", "worker")
    }


def _env_prefix(command: str) -> dict[str, str]:
    """``A=1 B=2 ray start ...`` -> {A: 1, B: 2} (assignments right before ``ray start``)."""
    words = _tokens(command)
    start = next(i for i, (a, b) in enumerate(zip(words, words[1:])) if (a, b) == ("ray", "start"))
    env: dict[str, str] = {}
    for word in reversed(words[:start]):
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", word):
            break
        key, value = word.split("=", 1)
        env[key] = value
    return env


def _flag(words: list[str], name: str) -> str | None:
    for i, word in enumerate(words):
        if word == name:
            return words[i + 1]
        if word.startswith(name + "="):
            return word.split("=", 1)[1]
    return None


def _cluster_env(cluster: dict[str, Any]) -> dict[str, str]:
    """What every node's Ray sees, from its ``ray start`` lines (the same on every node)."""
    envs = [_env_prefix(c) for commands in _ray_start_commands(cluster).values() for c in commands]
    assert all(env == envs[0] for env in envs), envs
    return envs[0]


def _guide_bash() -> list[str]:
    """The AWS guide's walkthrough bash block as logical commands (continuations joined)."""
    text = GUIDE.read_text()
    assert text.count(GUIDE_SECTION) == 1, "the AWS guide's walkthrough section missing or duplicated"
    section = text.split(GUIDE_SECTION, 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "the cluster section has exactly one bash block"
    return [line for line in blocks[0].replace("\\\n", " ").splitlines() if line.strip()]


def _train_invocations() -> list[Any]:
    """argparse namespaces of every ``training/train.py`` run in the AWS guide's walkthrough."""
    runs = []
    for line in _guide_bash():
        words = _tokens(line)
        if "training/train.py" in words:
            runs.append(arguments.build_parser().parse_args(words[words.index("training/train.py") + 1 :]))
    return runs


# ---------------------------------------------------------------- (a) Ray's own validation


def test_cluster_yaml_passes_ray_validation(cluster):
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(cluster))
    validate_config(prepared)
    # Everything is spelled out: nothing (e.g. defaults.yaml's nightly-wheel setup) is filled in.
    for key in ("setup_commands", "head_setup_commands", "worker_setup_commands", "initialization_commands"):
        assert key in cluster
    assert "nightly" not in yaml.safe_dump(prepared) and "ray-wheels" not in yaml.safe_dump(prepared)


# ---------------------------------------------------------------- (b) structure


def test_head_takes_no_work_and_gpu_workers_autoscale(cluster):
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and head["resources"].get("GPU", 0) == 0

    gpu_types = _gpu_worker_types(cluster)
    assert gpu_types, "no worker type offers a GPU"
    for node_type in gpu_types.values():
        assert 0 <= node_type["min_workers"] <= node_type["max_workers"] <= cluster["max_workers"]
    assert sum(t.get("min_workers", 0) for t in types.values()) <= cluster["max_workers"]
    assert sum(t["max_workers"] for t in gpu_types.values()) >= cluster["max_workers"], (
        "the global max_workers is reachable with GPU workers alone"
    )
    assert cluster["idle_timeout_minutes"] > 0 and cluster["upscaling_speed"] > 0
    assert cluster["provider"]["type"] == "aws"
    assert all(
        az.startswith(cluster["provider"]["region"])
        for az in cluster["provider"]["availability_zone"].split(",")
    )


def test_docker_image_and_gpu_options(cluster):
    docker = cluster["docker"]
    image = docker["image"]
    assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), "pin an image tag"
    assert docker["container_name"]
    worker_options = " ".join(_docker_options(cluster, "worker"))
    assert "--gpus all" in worker_options
    assert "--gpus" not in " ".join(_docker_options(cluster, "head")), "the CPU head has no GPU to pass"
    assert "--ulimit nofile=65536:65536" in worker_options


def test_model_store_is_one_nfs_mount_on_every_node(cluster):
    nfs = _nfs_mounts(cluster["initialization_commands"])
    assert STORE in nfs, "initialization_commands mount the store over NFS on each host"
    assert re.fullmatch(r"fs-[0-9a-f]+\.efs\.[a-z0-9-]+\.amazonaws\.com:/", nfs[STORE])
    assert f".efs.{cluster['provider']['region']}." in nfs[STORE]
    for role in ("head", "worker"):
        assert _bind_mounts(_docker_options(cluster, role)).get(STORE) == STORE
    assert STORE in _shared_mounts(cluster)


def test_every_ray_start_has_the_store_and_token_auth(cluster):
    starts = _ray_start_commands(cluster)
    assert starts["head"] and starts["worker"]
    for role, commands in starts.items():
        assert cluster[f"{role}_start_ray_commands"][0] == "ray stop"
        for command in commands:
            env = _env_prefix(command)
            assert env.get("MODEL_BASE_PATH") == STORE, command
            assert env.get("RAY_AUTH_MODE") == "token", command
            assert "--disable-usage-stats" in _tokens(command)
    (head_start,) = starts["head"]
    words = _tokens(head_start)
    assert _flag(words, "--dashboard-host") == "127.0.0.1"
    assert _flag(words, "--autoscaling-config") == "~/ray_bootstrap_config.yaml"
    (worker_start,) = starts["worker"]
    assert _flag(_tokens(worker_start), "--address") == "$RAY_HEAD_IP:6379"


def test_token_reaches_every_node(cluster):
    # The launcher does not distribute Ray's token: file_mounts copies the local one to every
    # node at Ray's default path.
    assert cluster["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert "RAY_AUTH_MODE=token" in " ".join(_docker_options(cluster, "worker"))


def test_project_is_synced_and_installed(cluster):
    assert cluster["file_mounts"]["~/mnist-ray"] == "."
    assert any("-e ~/mnist-ray" in c for c in cluster["setup_commands"])
    assert ".gitignore" in cluster["rsync_filter"]
    excluded = set(cluster["rsync_exclude"])
    assert {".venv", "runs", "models"} <= excluded and "**/.git" in excluded


def test_no_open_inbound_port_but_ssh(cluster):
    # No security_group: the launcher's default allows SSH plus intra-cluster traffic only.
    group = cluster["provider"].get("security_group")
    for rule in (group or {}).get("IpPermissions", []):
        if any(r.get("CidrIp") == "0.0.0.0/0" for r in rule.get("IpRanges", [])):
            assert rule["FromPort"] == rule["ToPort"] == 22, rule
    for node_type in cluster["available_node_types"].values():
        assert "SecurityGroupIds" not in node_type["node_config"]


def test_account_and_region_agree_everywhere(cluster):
    image = cluster["docker"]["image"]
    match = re.fullmatch(r"(\d{12})\.dkr\.ecr\.([a-z0-9-]+)\.amazonaws\.com/[\w.-]+:[\w.-]+", image)
    assert match, image
    account, region = match.groups()
    assert region == cluster["provider"]["region"]
    registry = image.split("/", 1)[0]
    assert any(f"--password-stdin {registry}" in c for c in cluster["initialization_commands"])
    for node_type in cluster["available_node_types"].values():
        arn = node_type["node_config"]["IamInstanceProfile"]["Arn"]
        assert arn.startswith(f"arn:aws:iam::{account}:instance-profile/"), arn


def test_dockerfile_matches_the_project_pins():
    text = DOCKERFILE.read_text()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    every = project["dependencies"] + [
        dep for extra in project["optional-dependencies"].values() for dep in extra
    ]
    pins = dict(
        re.match(r"([A-Za-z0-9_.-]+)(?:\[[^]]*\])?==(.+)", dep).groups()
        for dep in every
        if "==" in dep and not dep.startswith("mnist-ray")
    )
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, flags=re.M))
    assert args["RAY_VERSION"] == pins["ray"]
    assert args["TF_VERSION"] == pins["tensorflow"]
    assert re.search(rf"^FROM tensorflow/serving:{re.escape(pins['tensorflow'])}-gpu$", text, flags=re.M)
    assert re.search(r"^ENTRYPOINT \[\]$", text, flags=re.M), (
        "reset TF Serving's entrypoint for Ray's launcher"
    )
    assert f"MODEL_BASE_PATH={STORE}" in text and 'MODEL_NAME=""' in text
    assert (ROOT / ".ci" / "docker" / "Dockerfile.dockerignore").is_file()


# ---------------------------------------------------------------- (c) agreement with gpu.yaml


def test_gpu_yaml_serves_from_the_mounted_store(cluster, gpu_app):
    model_base_path = gpu_app["args"]["model_base_path"]
    assert any(_is_under(model_base_path, mount) for mount in _shared_mounts(cluster))
    # What the app really serves on the cluster: args plus the nodes' environment (cluster.yaml's
    # ray start lines; the image sets MODEL_NAME="").
    env = {"MODEL_NAME": "", **_cluster_env(cluster)}
    served = AppConfig.model_validate(gpu_app["args"]).with_env_overrides(env)
    assert served.model_base_path == model_base_path == f"{STORE}/{served.model_name}"


def test_replicas_fit_the_gpu_workers(cluster, gpu_deployment):
    options = gpu_deployment["ray_actor_options"]
    autoscaling = gpu_deployment["autoscaling_config"]
    gpu_types = _gpu_worker_types(cluster)
    gpus_per_node = max(t["resources"]["GPU"] for t in gpu_types.values())
    assert 0 < options["num_gpus"] <= gpus_per_node
    assert any(
        options["num_gpus"] <= t["resources"]["GPU"] and options["num_cpus"] <= t["resources"]["CPU"]
        for t in gpu_types.values()
    ), "one replica fits on a GPU worker"
    total_gpus = sum(t["max_workers"] * t["resources"]["GPU"] for t in gpu_types.values())
    assert autoscaling["max_replicas"] * options["num_gpus"] <= total_gpus
    # ... with room for the AWS guide's training job running alongside at full scale.
    training_gpus = max(run.num_workers for run in _train_invocations())
    assert autoscaling["max_replicas"] * options["num_gpus"] + training_gpus <= total_gpus


# ---------------------------------------------------------------- (d) the AWS guide's walkthrough


def test_aws_guide_training_uses_the_served_store_and_shared_checkpoints(cluster, gpu_app):
    runs = _train_invocations()
    assert len(runs) >= 2, "first training run and the continuous-training run"
    store = gpu_app["args"]["model_base_path"]
    assert store == f"{_cluster_env(cluster)['MODEL_BASE_PATH']}/{gpu_app['args']['model_name']}"
    shared = _shared_mounts(cluster)
    for run in runs:
        assert run.model_path == "/mnt/models/mnist" == store
        assert run.use_gpu
        assert run.storage_path and any(_is_under(run.storage_path, mount) for mount in shared)
        assert not _is_under(run.storage_path, store), "checkpoints live beside the models, not inside"
    assert any(run.init_from == "latest" for run in runs), "the continuous-training step"


def test_aws_guide_commands_use_this_repository(cluster):
    commands = [_tokens(line) for line in _guide_bash()]
    flat = [" ".join(words) for words in commands]
    image = next(w.split("=", 1)[1] for words in commands for w in words if w.startswith("IMAGE="))
    assert image == cluster["docker"]["image"]
    assert any(c.startswith("docker build -f .ci/docker/Dockerfile") for c in flat)
    for step in ("ray up cluster.yaml", "ray dashboard cluster.yaml", "ray down cluster.yaml"):
        assert step in flat
    assert "export RAY_AUTH_MODE=token" in flat
    assert any(
        c.startswith("serve deploy serve_configs/gpu.yaml --address http://127.0.0.1:8265") for c in flat
    )
    edge = yaml.safe_load(EDGE_YAML.read_text())  # clients reach the app through the edge, over TLS
    grpc_port = edge["grpc_port"]
    client = next(words for words in commands if "client/grpc_client.py" in words)
    assert _flag(client, "--port") == str(grpc_port)
    assert _flag(client, "--ca-cert") is not None
    attach = next(words for words in commands if words[:2] == ["ray", "attach"])
    assert str(grpc_port) in attach


def test_the_store_is_writable_where_training_publishes_only(cluster):
    """Replicas run on the GPU workers: there the store is read-only (docs/security.md), except
    Ray Train's checkpoint directory; nothing makes it writable by every user of a host."""
    options = _docker_options(cluster, "worker")
    mounts = [value for flag, value in zip(options, options[1:]) if flag in {"-v", "--volume"}]
    store_mounts = {value.split(":")[1]: value.split(":")[2:] for value in mounts}
    assert store_mounts[STORE] == ["ro"]
    assert [target for target, mode in store_mounts.items() if not mode and target.startswith(STORE)] == [
        f"{STORE}/_ray_results"
    ]
    head = [
        value
        for flag, value in zip(_docker_options(cluster, "head"), _docker_options(cluster, "head")[1:])
        if flag == "-v"
    ]
    assert f"{STORE}:{STORE}" in head
    assert not re.search(r"chmod\s+[0-7]?[0-7][0-7][2367]\b", " ".join(cluster["initialization_commands"]))
