"""cluster/: the AWS autoscaler config, the image and the KubeRay manifests are valid documents and
name what raysearch relies on (versions, entrypoints, import paths, resources, S3 access)."""

from __future__ import annotations

import importlib
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

import raysearch

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
IMAGE = f"registry.example.com/raysearch:{raysearch.__version__}-gpu"


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _pinned_ray() -> str:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    (pin,) = [d for d in deps if d.startswith("ray[")]
    return pin.split("==")[1]


def test_every_cluster_file_parses():
    files = sorted(CLUSTER.rglob("*.yaml"))
    assert {f.name for f in files} >= {"aws.yaml", "serve_config.yaml", "raycluster.yaml", "rayservice.yaml", "rayjobs.yaml"}
    for f in files:
        assert _docs(f), f


def test_ray_versions_everywhere_are_the_pinned_one():
    import ray

    ray_version = _pinned_ray()
    assert ray.__version__ == ray_version
    image = f"rayproject/ray:{ray_version}-py311-gpu"
    assert yaml.safe_load((CLUSTER / "aws.yaml").read_text())["docker"]["image"] == image
    assert re.search(rf"^FROM {re.escape(image)}$", (CLUSTER / "Dockerfile").read_text(), re.M)
    for name in ("raycluster.yaml", "rayservice.yaml"):
        for doc in _docs(CLUSTER / "kuberay" / name):
            if doc["kind"] in ("RayCluster", "RayService"):
                spec = doc["spec"].get("rayClusterConfig", doc["spec"])
                assert spec["rayVersion"] == ray_version


def test_aws_config_passes_rays_own_validation_and_uses_instance_profiles():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    validate_config(prepare_config(config))    # Ray's JSON schema for cluster configs
    assert config["provider"]["type"] == "aws"
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}
    assert head["node_config"]["IamInstanceProfile"]["Name"] == "raysearch-head"
    workers = {k: v for k, v in types.items() if k != config["head_node_type"]}
    assert any(v["node_config"]["InstanceType"].startswith(("g4dn", "g5", "g6", "p3", "p4", "p5")) for v in workers.values())
    for node_type in workers.values():
        assert node_type["node_config"]["IamInstanceProfile"]["Name"] == "raysearch-worker"
        assert node_type["max_workers"] >= 1
    assert "AWS_SECRET_ACCESS_KEY" not in (CLUSTER / "aws.yaml").read_text()
    # The synced checkout is what the setup command installs.
    (target,) = [t for t, src in config["file_mounts"].items() if src == "."]
    assert config["setup_commands"] == [f"bash {target}/cluster/install.sh {target}"]


def test_install_script_swaps_faiss_cpu_for_faiss_gpu():
    lines = [ln.strip() for ln in (CLUSTER / "install.sh").read_text().splitlines() if ln.strip() and not ln.strip().startswith("#")]
    install = lines.index('pip install --no-cache-dir "$SRC"')
    uninstall = lines.index("pip uninstall -y faiss-cpu")
    gpu = lines.index('pip install --no-cache-dir "$FAISS_GPU"')
    assert install < uninstall < gpu
    assert 'FAISS_GPU="${FAISS_GPU:-faiss-gpu-cu12>=1.8}"' in lines
    assert "RUN bash cluster/install.sh /home/ray/raysearch" in (CLUSTER / "Dockerfile").read_text()


def _pod_specs(cluster_spec: dict) -> list[tuple[str, dict]]:
    out = [("head", cluster_spec["headGroupSpec"]["template"]["spec"])]
    out += [(g["groupName"], g["template"]["spec"]) for g in cluster_spec["workerGroupSpecs"]]
    return out


def test_raycluster_runs_the_raysearch_image_with_gpus_and_s3_role():
    docs = _docs(CLUSTER / "kuberay" / "raycluster.yaml")
    (account,) = [d for d in docs if d["kind"] == "ServiceAccount"]
    (cluster,) = [d for d in docs if d["kind"] == "RayCluster"]
    assert cluster["apiVersion"] == "ray.io/v1"
    assert account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")
    assert cluster["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    gpus = {}
    for group, pod in _pod_specs(cluster["spec"]):
        assert pod["serviceAccountName"] == account["metadata"]["name"]
        (container,) = pod["containers"]
        assert container["image"] == IMAGE
        gpus[group] = int(container["resources"]["limits"].get("nvidia.com/gpu", 0))
    assert gpus["gpu"] == 1 and gpus["head"] == 0


def test_rayservice_deploys_the_serve_app_of_serve_config():
    from raysearch.serve.config import ServeConfig

    (service,) = _docs(CLUSTER / "kuberay" / "rayservice.yaml")
    assert service["kind"] == "RayService" and service["apiVersion"] == "ray.io/v1"
    serve = yaml.safe_load(service["spec"]["serveConfigV2"])
    reference = yaml.safe_load((CLUSTER / "serve_config.yaml").read_text())
    (app,) = serve["applications"]
    assert app["import_path"] == reference["applications"][0]["import_path"]
    module, attr = app["import_path"].split(":")
    assert callable(getattr(importlib.import_module(module), attr))
    config = ServeConfig.from_args(app["args"])          # unknown keys would be refused
    assert config.index_dir.startswith("s3://") and config.embedder_gpus == 1
    assert serve["http_options"]["port"] == 8000
    cluster = service["spec"]["rayClusterConfig"]
    head_ports = {p["containerPort"] for p in cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]}
    assert 8000 in head_ports
    service_accounts = {d["metadata"]["name"] for d in _docs(CLUSTER / "kuberay" / "raycluster.yaml") if d["kind"] == "ServiceAccount"}
    for _, pod in _pod_specs(cluster):
        (container,) = pod["containers"]
        assert container["image"] == IMAGE
        assert pod["serviceAccountName"] in service_accounts
        (env,) = [e for e in container["env"] if e["name"] == "RAYSEARCH_API_KEY"]
        assert env["valueFrom"]["secretKeyRef"]["name"] == "raysearch-api-key"   # from a secret, never inline


@pytest.mark.parametrize("job", ["disc21", "gldv2"])
def test_rayjobs_run_the_job_entrypoints_on_the_build_cluster(job):
    docs = {d["metadata"]["name"]: d for d in _docs(CLUSTER / "kuberay" / "rayjobs.yaml")}
    (cluster,) = [d for d in _docs(CLUSTER / "kuberay" / "raycluster.yaml") if d["kind"] == "RayCluster"]
    spec = docs[f"raysearch-{job}"]["spec"]
    assert spec["clusterSelector"]["ray.io/cluster"] == cluster["metadata"]["name"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["python", f"/home/ray/raysearch/jobs/{job}.py"]
    assert (REPO / "jobs" / f"{job}.py").is_file()       # the Dockerfile copies the repository there
    args = importlib.import_module(f"jobs.{job}").parse_args(argv[2:])
    assert args.out.startswith("s3://") and args.root.startswith("s3://")


def test_docs_name_only_existing_job_files():
    text = (REPO / "docs" / "cluster.md").read_text()
    named = set(re.findall(r"jobs/(\w+)\.py", text))
    assert named >= {"disc21", "gldv2"}
    for name in named:
        assert (REPO / "jobs" / f"{name}.py").is_file(), name
