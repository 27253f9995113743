"""The KubeRay manifests (serve_configs/kuberay/) validated offline, as far as that can go here.

No Kubernetes API server can run here, so each object is checked against what such a server and
KubeRay's operator would check: the ray.io objects against KubeRay 1.7.0's CRD schemas (made
strict, as ``kubectl apply``'s server-side field validation is: an unknown field fails), the core
objects and every pod template with kubernetes-validate (Kubernetes' own OpenAPI schemas, strict).
Then what no schema knows: the RayService's app is serve_configs/gpu.yaml and passes Serve's and
our own config models, the training entrypoints parse with train.py's parser and fit the clusters
they run on, the front door's environment is ray_app.front_door's, and the store is mounted where
the configs say, writable only by training.
"""

from __future__ import annotations

import copy
import os
import re
import shlex
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from ray_app.config import AppConfig, LiveConfig
from ray_app.front_door import IMAGE_STATE_DIR, front_door_env
from training import arguments, retention

REPO = Path(__file__).resolve().parents[2]
MANIFESTS = REPO / "serve_configs" / "kuberay"
GPU_CONFIG = REPO / "serve_configs" / "gpu.yaml"
CRDS = Path(os.environ.get("KUBERAY_CRDS_DIR", REPO.parent / "shared" / "kuberay" / "crds-v1.7.0"))
KUBERNETES_VERSION = "1.33"
STORE_MOUNT = "/mnt/models"
TRAIN_SCRIPT = "/opt/mnist-ray/training/train.py"  # the project's place in .ci/docker/Dockerfile

needs_crds = pytest.mark.skipif(
    not CRDS.is_dir(),
    reason=f"KubeRay 1.7.0's CRDs not found at {CRDS}: get them from ray-project/kuberay, tag v1.7.0, "
    "ray-operator/config/crd/bases/, and point KUBERAY_CRDS_DIR at that folder",
)


def _documents() -> list[tuple[str, dict[str, Any]]]:
    found = []
    for path in sorted(MANIFESTS.glob("*.yaml")):
        found += [(path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return found


def _one(kind: str) -> dict[str, Any]:
    (doc,) = [doc for _, doc in _documents() if doc["kind"] == kind]
    return doc


def _strict(schema: Any) -> Any:
    """The schema with unknown fields refused wherever it lists the known ones (as the API server's
    strict field validation does), leaving maps (additionalProperties) and preserved subtrees open."""
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    strict = {key: _strict(value) for key, value in schema.items()}
    if (
        "properties" in schema
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        strict["additionalProperties"] = False
    return strict


@cache
def _crd_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    schemas = {}
    for path in CRDS.glob("*.yaml"):
        crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            schemas[(f"{group}/{version['name']}", kind)] = _strict(version["schema"]["openAPIV3Schema"])
    return schemas


def _crd_errors(doc: dict[str, Any]) -> list[str]:
    schema = _crd_schemas()[(doc["apiVersion"], doc["kind"])]
    validator = jsonschema.Draft7Validator(schema)
    return [
        f"{'/'.join(map(str, error.absolute_path))}: {error.message}" for error in validator.iter_errors(doc)
    ]


_DNS_1123 = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


def _pod_templates(value: Any, path: str = "") -> list[tuple[str, dict[str, Any]]]:
    """Every pod template (a ``template`` holding a ``spec.containers``) anywhere in ``value``."""
    found = []
    if isinstance(value, dict):
        for key, inner in value.items():
            where = f"{path}/{key}"
            if key == "template" and isinstance(inner, dict) and "containers" in inner.get("spec", {}):
                found.append((where, inner))
            found += _pod_templates(inner, where)
    elif isinstance(value, list):
        for index, inner in enumerate(value):
            found += _pod_templates(inner, f"{path}/{index}")
    return found


@needs_crds
@pytest.mark.parametrize("kind", ["RayService", "RayJob", "RayCronJob"])
def test_ray_objects_match_kuberay_crd_schemas(kind):
    doc = _one(kind)
    assert doc["apiVersion"] == "ray.io/v1"
    assert _crd_errors(doc) == []
    assert _DNS_1123.fullmatch(doc["metadata"]["name"]) and len(doc["metadata"]["name"]) <= 63


@needs_crds
@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda d: d["spec"].__setitem__("serveConfigV3", "x"), "Additional properties"),
        (
            lambda d: d["spec"]["rayClusterConfig"].__setitem__("enableInTreeAutoscaling", "yes"),
            "is not of type",
        ),
        (
            lambda d: d["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"].__setitem__(
                "backend", "etcd"
            ),
            "is not one of",
        ),
        (
            lambda d: d["spec"]["rayClusterConfig"]["workerGroupSpecs"][0].pop("groupName"),
            "is a required property",
        ),
    ],
)
def test_the_crd_check_refuses_what_the_api_server_would(change, expected):
    doc = copy.deepcopy(_one("RayService"))
    change(doc)
    errors = _crd_errors(doc)
    assert errors and any(expected in error for error in errors), errors


def test_core_objects_and_pod_templates_pass_kubernetes_schemas():
    checked = []
    for name, doc in _documents():
        if doc["apiVersion"].startswith("ray.io/"):
            for where, template in _pod_templates(doc["spec"]):
                pod_template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}}
                kubernetes_validate.validate(
                    {**pod_template, "template": template}, KUBERNETES_VERSION, strict=True
                )
                checked.append(f"{name}:{where}")
        else:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
            checked.append(f"{name}:{doc['kind']}")
    # 5 core objects; 2 pod templates in the RayService, 2 in the RayJob, 2 in the RayCronJob
    assert len(checked) == 11, checked


def test_kubernetes_validate_refuses_a_bad_pod_template():
    template = copy.deepcopy(_pod_templates(_one("RayJob")["spec"])[0][1])
    template["spec"]["containers"][0]["volumeMount"] = template["spec"]["containers"][0].pop("volumeMounts")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(
            {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template},
            KUBERNETES_VERSION,
            strict=True,
        )


def test_the_rayservice_serves_exactly_gpu_yaml():
    serve_config = yaml.safe_load(_one("RayService")["spec"]["serveConfigV2"])
    assert serve_config == yaml.safe_load(GPU_CONFIG.read_text()), (
        "serveConfigV2 in serve_configs/kuberay/rayservice.yaml differs from serve_configs/gpu.yaml: "
        "paste gpu.yaml into it (indented 4 spaces)"
    )


def test_serve_config_v2_passes_serves_schema_and_our_config_models():
    from ray.serve.schema import ServeDeploySchema

    serve_config = yaml.safe_load(_one("RayService")["spec"]["serveConfigV2"])
    deploy = ServeDeploySchema.parse_obj(serve_config)
    assert [app.name for app in deploy.applications] == ["mnist"]
    for app in serve_config["applications"]:
        config = AppConfig.model_validate(app["args"])
        assert config.model_base_path.startswith(STORE_MOUNT + "/")
        for deployment in app["deployments"]:
            LiveConfig.model_validate(deployment["user_config"])


def _ray_container(template: dict[str, Any]) -> dict[str, Any]:
    """The container KubeRay starts Ray in: the first one (others are sidecars)."""
    return template["spec"]["containers"][0]


def _cpus(template: dict[str, Any]) -> float:
    return float(_ray_container(template)["resources"]["limits"]["cpu"])


def test_serving_pods_get_the_front_doors_environment_for_their_size():
    service = _one("RayService")["spec"]["rayClusterConfig"]
    templates = [service["headGroupSpec"]["template"]] + [g["template"] for g in service["workerGroupSpecs"]]
    config_map = _one("ConfigMap")
    for template in templates:
        assert {"configMapRef": {"name": config_map["metadata"]["name"]}} in _ray_container(template)[
            "envFrom"
        ]
    smallest = min(_cpus(template) for template in templates)
    assert config_map["data"] == front_door_env(
        smallest, cluster=True, state_dir=IMAGE_STATE_DIR, environ={}
    ), (
        "regenerate common.yaml's ConfigMap: python -m ray_app.front_door --cluster "
        f"--cpus {smallest:g} --state-dir {IMAGE_STATE_DIR}"
    )


def test_haproxys_admin_socket_is_in_a_directory_the_image_makes_private():
    """Ray renders the admin socket ``mode 666 level admin``; KubeRay starts Ray itself, so the
    ConfigMap puts HAProxy's state in the image's directory, which the Dockerfile makes mode 0700
    (KubeRay's default would be Ray's shared ``/tmp/haproxy-serve``)."""
    data = _one("ConfigMap")["data"]
    for variable in ("RAY_SERVE_HAPROXY_SOCKET_PATH", "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH"):
        assert os.path.dirname(data[variable]) == IMAGE_STATE_DIR
    dockerfile = (REPO / ".ci" / "docker" / "Dockerfile").read_text()
    assert re.search(rf"^RUN install -d -m 0700 {re.escape(IMAGE_STATE_DIR)}$", dockerfile, re.MULTILINE)


def _store_mounts(template: dict[str, Any]) -> list[dict[str, Any]]:
    container = _ray_container(template)
    return [mount for mount in container.get("volumeMounts", []) if mount["mountPath"] == STORE_MOUNT]


def _claim(template: dict[str, Any], volume: str) -> dict[str, Any]:
    (found,) = [v for v in template["spec"]["volumes"] if v["name"] == volume]
    return found["persistentVolumeClaim"]


def _training_clusters() -> list[dict[str, Any]]:
    return [
        _one("RayJob")["spec"]["rayClusterSpec"],
        _one("RayCronJob")["spec"]["jobTemplate"]["rayClusterSpec"],
    ]


def test_the_store_is_one_rwx_volume_read_only_for_serving_writable_for_training():
    claims = {
        doc["metadata"]["name"]: doc for _, doc in _documents() if doc["kind"] == "PersistentVolumeClaim"
    }
    claim = claims["mnist-models"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]

    service = _one("RayService")["spec"]["rayClusterConfig"]
    for group in service["workerGroupSpecs"]:  # replicas run on the workers only (the head has num-cpus 0)
        (mount,) = _store_mounts(group["template"])
        assert mount["readOnly"] is True
        assert _claim(group["template"], mount["name"]) == {"claimName": "mnist-models", "readOnly": True}
    assert service["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"

    for cluster in _training_clusters():
        for template in [cluster["headGroupSpec"]["template"]] + [
            g["template"] for g in cluster["workerGroupSpecs"]
        ]:
            (mount,) = _store_mounts(template)  # the driver publishes, the workers checkpoint
            assert not mount.get("readOnly", False)
            assert _claim(template, mount["name"])["claimName"] == "mnist-models"


def _train_args(entrypoint: str):
    argv = shlex.split(entrypoint)
    assert argv[:2] == ["python", TRAIN_SCRIPT], argv[:2]
    assert (REPO / Path(TRAIN_SCRIPT).relative_to("/opt/mnist-ray")).is_file()
    return arguments.build_parser().parse_args(argv[2:])


@pytest.mark.parametrize("kind", ["RayJob", "RayCronJob"])
def test_training_entrypoints_parse_and_fit_their_cluster(kind):
    spec = _one(kind)["spec"]
    job = spec["jobTemplate"] if kind == "RayCronJob" else spec
    args = _train_args(job["entrypoint"])
    serve_app = yaml.safe_load(GPU_CONFIG.read_text())["applications"][0]["args"]
    assert args.model_path == serve_app["model_base_path"]  # trains into the store that is served
    arguments.resolve_run_name(args.run_name)  # a valid, stable directory name after its date codes
    assert args.run_name != arguments.DEFAULT_RUN_NAME  # a fixed name: a retry resumes, not restarts

    (workers,) = job["rayClusterSpec"]["workerGroupSpecs"]
    assert workers["replicas"] == workers["minReplicas"] == workers["maxReplicas"] == args.num_workers
    (container,) = workers["template"]["spec"]["containers"]
    assert args.use_gpu and container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert args.cpus_per_worker <= _cpus(workers["template"])
    assert job["shutdownAfterJobFinishes"] is True


def test_the_nightly_job_fine_tunes_gates_and_protects_what_is_served():
    cron = _one("RayCronJob")["spec"]
    args = _train_args(cron["jobTemplate"]["entrypoint"])
    assert args.init_from == "latest" and args.must_beat_latest
    assert "%Y%m%d" in args.run_name  # one run per day: a retry that day resumes it
    assert args.keep_versions and args.keep_versions >= 2
    serve_service = _one("RayService")["spec"]["serveService"]
    http_port = next(p["port"] for p in serve_service["spec"]["ports"] if p["name"] == "http")
    assert args.protect_from == [f"http://{serve_service['metadata']['name']}:{http_port}"]
    assert _training_clusters()[0] == _training_clusters()[1], (
        "the nightly job runs on the RayJob's cluster spec"
    )


def test_gcs_fault_tolerance_and_ray_auth_use_objects_that_exist():
    cluster = _one("RayService")["spec"]["rayClusterConfig"]
    redis_service = next(doc for _, doc in _documents() if doc["kind"] == "Service")
    host, port = cluster["gcsFaultToleranceOptions"]["redisAddress"].split(":")
    assert (
        host == redis_service["metadata"]["name"] and int(port) == redis_service["spec"]["ports"][0]["port"]
    )
    password = cluster["gcsFaultToleranceOptions"]["redisPassword"]["valueFrom"]["secretKeyRef"]
    redis = _one("Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert {"name": "REDIS_PASSWORD", "valueFrom": {"secretKeyRef": password}} in redis["env"]
    # Ray's token auth on in every cluster, all with the same token, so one token drives them all.
    auths = [cluster["authOptions"]] + [c["authOptions"] for c in _training_clusters()]
    assert all(auth["mode"] == "token" for auth in auths)
    assert len({auth["secretName"] for auth in auths}) == 1


def test_the_data_path_tokens_reach_the_replicas_and_the_nightly_job():
    """serveConfigV2's auth.token_file lies in a Secret volume mounted on every pod that runs
    replicas (else every request would be refused), and the nightly job's driver, which asks the
    app for its loaded versions, gets a token from the same Secret."""
    serve_config = yaml.safe_load(_one("RayService")["spec"]["serveConfigV2"])
    (app,) = serve_config["applications"]
    token_file = Path(AppConfig.model_validate(app["args"]).auth.token_file.replace("~", "/root", 1))
    service = _one("RayService")["spec"]["rayClusterConfig"]
    secrets = set()
    for group in service["workerGroupSpecs"]:
        (container,) = group["template"]["spec"]["containers"]
        (mount,) = [m for m in container["volumeMounts"] if token_file.is_relative_to(m["mountPath"])]
        assert mount["readOnly"] and "subPath" not in mount  # a subPath mount would never see a rotation
        (volume,) = [v for v in group["template"]["spec"]["volumes"] if v["name"] == mount["name"]]
        items = {item["path"]: item["key"] for item in volume["secret"].get("items", [])}
        assert str(token_file.relative_to(mount["mountPath"])) in items
        secrets.add(volume["secret"]["secretName"])
    (secret,) = secrets
    for cluster in _training_clusters():
        (head,) = cluster["headGroupSpec"]["template"]["spec"]["containers"]
        (token,) = [e for e in head["env"] if e["name"] == retention.TOKEN_ENV]
        assert token["valueFrom"]["secretKeyRef"]["name"] == secret


def test_the_edge_sidecar_owns_the_service_ports_and_forwards_to_rays_haproxy():
    """The client Service's ports are the edge's; the edge forwards to the ports serveConfigV2
    gives Ray's HAProxy; its TLS files lie in the Secret volume mounted into the edge container."""
    from ray_app.edge import config as edge_config

    service = _one("RayService")["spec"]
    head = service["rayClusterConfig"]["headGroupSpec"]["template"]
    (edge,) = [
        c for c in head["spec"]["containers"] if c.get("command", [])[:3] == ["python", "-m", "ray_app.edge"]
    ]
    path = edge["command"][edge["command"].index("--config") + 1]
    edge_yaml = REPO / Path(path).relative_to("/opt/mnist-ray")
    settings = edge_config.load(edge_yaml)
    targets = {p["name"]: p["targetPort"] for p in service["serveService"]["spec"]["ports"]}
    assert targets == {"grpc": settings.grpc_port, "http": settings.http_port}
    assert {p["containerPort"] for p in edge["ports"]} == set(targets.values())
    serve_config = yaml.safe_load(service["serveConfigV2"])
    assert settings.upstream.host == "127.0.0.1"  # the same pod's network
    assert (settings.upstream.grpc_port, settings.upstream.http_port) == (
        serve_config["grpc_options"]["port"],
        serve_config["http_options"]["port"],
    )
    (mount,) = edge["volumeMounts"]
    assert mount["readOnly"] and "subPath" not in mount
    (volume,) = [v for v in head["spec"]["volumes"] if v["name"] == mount["name"]]
    assert "secret" in volume
    raw_tls = yaml.safe_load(edge_yaml.read_text())["tls"]  # as written: ~ is the pod's HOME, /root
    for name in ("server_cert", "server_key", "custom_ca"):
        assert getattr(settings.tls, name) is not None, name
        file = Path(raw_tls[name].replace("~", "/root", 1))
        assert file.is_relative_to(mount["mountPath"]), (name, file)
