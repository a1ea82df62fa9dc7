"""The cluster files (cluster/) and every shipped config, checked without a cluster or a running Ray.

A manifest that cannot start fails here: the image must carry the Ray version rayft is tested with, every Ray
pod must mount the shared volume at the same path, the one install step (the job's runtime environment:
working_dir + pip) must match pyproject.toml, and every entry point must name a job that exists with a config
that loads and keeps its runs and adapters on the shared volume.
"""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
MOUNT = "/mnt/cluster_storage"  # the shared volume, at the same path on every node
RAY_VERSION = version("ray")
IMAGE_RE = re.compile(rf"^rayproject/ray:{re.escape(RAY_VERSION)}-py3(\d+)-gpu$")
ENTRY_RE = re.compile(r"python (jobs/[\w.]+\.py) --config (configs/[\w.-]+\.yaml)")


def docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((CLUSTER / name).read_text()) if d]


def one(name: str, kind: str) -> dict:
    (doc,) = [d for d in docs(name) if d.get("kind") == kind]
    return doc


def runtime_env() -> dict:
    return yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())


# ---------------------------------------------------------------------------------- config loaders


def _load_sweep(path):
    from rayft.sweep_config import load_sweep

    sweep, base = load_sweep(str(path))
    return {"run.storage_path": sweep.run.storage_path, "run.registry": sweep.run.registry or base.run.registry}


def _load_training(cls_path: str):
    def load(path):
        import importlib

        from rayft.config import load_config

        module, name = cls_path.rsplit(".", 1)
        cfg = load_config(getattr(importlib.import_module(module), name), path)
        return {"run.storage_path": cfg.run.storage_path, "run.registry": cfg.run.registry}
    return load


def _load_serve(path):
    from rayft.config import load_config
    from rayft.serving.config import ServeConfig

    return {"registry": load_config(ServeConfig, path).registry}


def _load_serve_deploy(path):
    from ray.serve.schema import ServeDeploySchema

    (app,) = ServeDeploySchema.model_validate(yaml.safe_load(Path(path).read_text())).applications
    assert app.import_path == "rayft.serving.app:build_app"
    return _load_serve(ROOT / app.args["config"])


def _load_pipeline(path):
    """The pipeline and every stage config it names, resolved as the pipeline resolves them."""
    from rayft.config import load_config
    from rayft.pipeline import PipelineConfig, stage_configs

    p = load_config(PipelineConfig, path)
    stage_configs(p)
    return {"storage_path": p.storage_path, "registry": p.registry}


def _load_eval(path):
    from rayft.config import load_config
    from rayft.serving.eval_config import EvalConfig

    load_config(EvalConfig, path)
    return {}


# The loader of each job's --config (what `python jobs/<job>.py --config` reads), and of each shipped config by
# its file name. A new config or job without a loader fails test_every_shipped_config_loads.
JOB_LOADERS = {
    "jobs/sft.py": _load_training("rayft.config.SFTConfig"),
    "jobs/dpo.py": _load_training("rayft.config.DPOConfig"),
    "jobs/reward_model.py": _load_training("rayft.config.RewardModelConfig"),
    "jobs/grpo.py": _load_training("rayft.rl.config.RLConfig"),
    "jobs/sweep.py": _load_sweep,
    "jobs/serve.py": _load_serve,
    "jobs/eval.py": _load_eval,
    "jobs/pipeline.py": _load_pipeline,
}
CONFIG_LOADERS = [  # (file-name pattern, loader), first match wins
    (r"^sft_", JOB_LOADERS["jobs/sft.py"]),
    (r"^(sweep_|dpo_.*_sweep)", _load_sweep),
    (r"^dpo_", JOB_LOADERS["jobs/dpo.py"]),
    (r"^reward_model_", JOB_LOADERS["jobs/reward_model.py"]),
    (r"^grpo_", JOB_LOADERS["jobs/grpo.py"]),
    (r"^serve_.*_deploy", _load_serve_deploy),
    (r"^serve_", _load_serve),
    (r"^eval_", _load_eval),
    (r"^pipeline_", _load_pipeline),
]


def config_loader(path: Path):
    for pattern, loader in CONFIG_LOADERS:
        if re.search(pattern, path.name):
            return loader
    raise AssertionError(f"{path.name}: no loader knows this config; add it to CONFIG_LOADERS")


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    paths = config_loader(path)(path)
    if "qwen05b" in path.name:  # the cluster configs: runs, checkpoints and adapters on the shared volume
        for field, value in paths.items():
            assert value and value.startswith(f"{MOUNT}/rayft/"), f"{path.name}: {field}={value} is not shared"


# ---------------------------------------------------------------------------------- the files in cluster/

CHECKS = {"raycluster.yaml", "rayjob-sft.yaml", "cluster-launcher.yaml", "runtime_env.yaml", "storage.yaml"}


def test_every_file_in_cluster_is_checked():
    assert {p.name for p in CLUSTER.iterdir()} == CHECKS, "a new file in cluster/ needs its checks here"
    for name in CHECKS:
        assert docs(name), name


def ray_cluster_specs() -> list[tuple[str, dict]]:
    """(where, RayClusterSpec) of the RayCluster and of the RayJob's cluster."""
    job = one("rayjob-sft.yaml", "RayJob")
    return [("raycluster.yaml", one("raycluster.yaml", "RayCluster")["spec"]),
            ("rayjob-sft.yaml", job["spec"]["rayClusterSpec"])]


def pods(spec: dict) -> list[tuple[str, dict]]:
    return [("head", spec["headGroupSpec"]["template"]["spec"])] + \
        [(g["groupName"], g["template"]["spec"]) for g in spec["workerGroupSpecs"]]


@pytest.mark.parametrize("where, spec", ray_cluster_specs(), ids=[w for w, _ in ray_cluster_specs()])
def test_kuberay_cluster_starts_the_tested_ray_with_shared_storage_and_gpus(where, spec):
    assert spec["rayVersion"] == RAY_VERSION
    assert spec["authOptions"] == {"mode": "token", "secretName": "rayft-ray-token"}  # Ray 2.60: token auth
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # training never lands on the head
    claim = one("storage.yaml", "PersistentVolumeClaim")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]  # head and workers on different nodes
    for group, pod in pods(spec):
        (ray,) = [c for c in pod["containers"] if c["name"].startswith("ray-")]
        m = IMAGE_RE.match(ray["image"])
        assert m and int(m.group(1)) >= 11, f"{where} {group}: image {ray['image']} is not Ray {RAY_VERSION}"
        # the old manifests installed from a path no volume provided; the install step is the job's runtime env
        assert "command" not in ray and "args" not in ray, f"{where} {group}: leave `ray start` to KubeRay"
        volumes = {v["name"]: v for v in pod["volumes"]}
        (mount,) = [vm for vm in ray["volumeMounts"] if vm["mountPath"] == MOUNT]
        assert volumes[mount["name"]]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    workers = spec["workerGroupSpecs"]
    assert workers and all(int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]) > 0
                           for g in workers)


def test_rayjob_runs_an_existing_job_from_the_shared_volume_with_the_runtime_env():
    job = one("rayjob-sft.yaml", "RayJob")
    spec = job["spec"]
    assert job["apiVersion"] == "ray.io/v1" and spec["submissionMode"] == "K8sJobMode"
    assert spec["shutdownAfterJobFinishes"] is True
    env = yaml.safe_load(spec["runtimeEnvYAML"])
    # a remote URI every node reads: a zip on the volume each Ray pod mounts (a plain path would be the
    # submitter pod's own directory, which does not exist there)
    assert env.pop("working_dir") == f"file://{MOUNT}/rayft/src/rayft-src.zip"
    assert env == runtime_env(), "the RayJob's runtime env differs from cluster/runtime_env.yaml"
    (entry,) = ENTRY_RE.findall(spec["entrypoint"])
    assert spec["entrypoint"] == "python {} --config {}".format(*entry)
    check_entry_point(*entry)


def test_runtime_env_installs_pyprojects_dependencies_and_not_ray():
    from ray.runtime_env import RuntimeEnv  # Ray's own validation of the fields (no cluster)

    env = runtime_env()
    RuntimeEnv(**env)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = [d for d in project["dependencies"] if not re.match(r"ray\b", d)]
    assert env["pip"] == deps + project["optional-dependencies"]["vllm"]
    assert not any(re.match(r"ray\b", d) for d in env["pip"]), "the image's Ray must not be replaced"
    assert set(env) == {"pip", "env_vars", "config"}  # working_dir comes from --working-dir or the RayJob


def test_cluster_launcher_is_valid_for_ray_and_shares_storage():
    import jsonschema
    import ray.autoscaler

    config = yaml.safe_load((CLUSTER / "cluster-launcher.yaml").read_text())
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)  # the launcher's own schema, from the installed Ray
    m = IMAGE_RE.match(config["docker"]["image"])
    assert m and int(m.group(1)) >= 11
    assert f"--volume {MOUNT}:{MOUNT}" in config["docker"]["run_options"]  # same path in every container
    init = " && ".join(config["initialization_commands"])
    assert re.search(rf"mount -t nfs4 .* {MOUNT}( |$)", init), "every host mounts the shared file system"
    assert config["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}  # one token on every node
    head = " ".join(config["head_start_ray_commands"])
    assert "ray start --head" in head and "--num-cpus=0" in head
    assert config["available_node_types"][config["head_node_type"]]["resources"] == {"CPU": 0}


def check_entry_point(job: str, config: str) -> None:
    assert (ROOT / job).is_file(), job
    assert (ROOT / config).is_file(), config
    paths = JOB_LOADERS[job](ROOT / config)
    for field, value in paths.items():
        assert value and value.startswith(f"{MOUNT}/rayft/"), f"{config}: {field}={value} is not on {MOUNT}"


def documented_entry_points() -> list[tuple[str, str, str]]:
    """Every `python jobs/... --config configs/...` in cluster/ and in the README's cluster section."""
    found = []
    for path in sorted(CLUSTER.iterdir()):
        found += [(path.name, *e) for e in ENTRY_RE.findall(path.read_text())]
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Run on a cluster", 1)[1].split("\n## ", 1)[0]
    found += [("README.md", *e) for e in ENTRY_RE.findall(section)]
    return found


def test_documented_entry_points_exist_and_keep_their_runs_on_the_shared_volume():
    entries = documented_entry_points()
    assert {where for where, *_ in entries} >= {"README.md", "raycluster.yaml", "rayjob-sft.yaml",
                                                 "cluster-launcher.yaml", "runtime_env.yaml"}
    for _, job, config in entries:
        check_entry_point(job, config)


def test_readme_commands_name_the_files_that_exist():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Run on a cluster", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"cluster/[\w.-]+\.yaml", section))
    assert named >= {f"cluster/{n}" for n in CHECKS}, "the README shows how each cluster file is used"
    assert all((ROOT / n).is_file() for n in named)
    for line in section.splitlines():  # each ray job submit ships the code and the install step
        if line.strip().startswith("ray job submit"):
            args = shlex.split(line.rstrip("\\"))
            assert "--working-dir" in args and args[args.index("--runtime-env") + 1] == "cluster/runtime_env.yaml"
