"""cluster.yaml and cluster-gcp.yaml: Ray's cluster launcher would accept them (its own defaults filled in and
its JSON schema, ``ray/autoscaler/ray-schema.json``), and they keep the promises the README makes.
No cloud is touched."""

import copy
import json
import re
from pathlib import Path

import jsonschema
import pytest
import ray.autoscaler
import tomllib
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ["cluster.yaml", "cluster-gcp.yaml"]


def _load(name: str) -> dict:
    return yaml.safe_load((ROOT / name).read_text())


@pytest.mark.parametrize("name", CONFIGS)
def test_the_launcher_accepts_it(name):
    config = _load(name)
    jsonschema.validate(config, json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text()))
    validate_config(prepare_config(copy.deepcopy(config)))  # what `ray up` does before it talks to the cloud


@pytest.mark.parametrize("name", CONFIGS)
def test_the_schema_check_is_live(name):
    config = _load(name)
    config["available_node_types"]["gpu_worker"]["min_workers"] = "none"
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(config))
    config = _load(name)
    config["idle_timeout_minute"] = 10  # a misspelt key
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(config))


def _gpu_types(config: dict) -> list[str]:
    gpus = []
    for name, node in config["available_node_types"].items():
        nc = node["node_config"]
        if (
            node["resources"].get("GPU")
            or nc.get("guestAccelerators")
            or re.match(r"(g\d|p\d)", nc.get("InstanceType", ""))
        ):
            gpus.append(name)
    return gpus


@pytest.mark.parametrize("name", CONFIGS)
def test_it_keeps_the_readmes_promises(name):
    config = _load(name)
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}, "the head must run no work"
    gpus = _gpu_types(config)
    assert gpus and all(types[g]["min_workers"] == 0 for g in gpus), "GPU workers scale from zero"
    cpus = [n for n in types if n not in gpus and n != config["head_node_type"]]
    assert cpus and all(types[c]["min_workers"] == 0 for c in cpus), "a CPU worker type for decoding and statistics"
    spot = [json.dumps(types[g]["node_config"]) for g in gpus]
    assert all("spot" in s.lower() for s in spot), "GPU workers may run on spot capacity"
    assert 0 < config["idle_timeout_minutes"] <= 30
    # the package at the version this checkout builds, from the wheel the file mount carries
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    wheel = f"semprobe-{version}-py3-none-any.whl"
    assert any(wheel in c for c in config["setup_commands"]), f"setup_commands must install {wheel}"
    assert any(Path(mount).as_posix() in " ".join(config["setup_commands"]) for mount in config["file_mounts"])
    # torch at the version the Makefile pins
    makefile_torch = re.search(r"TORCH \?= (.+)", (ROOT / "Makefile").read_text()).group(1).split()
    assert all(any(pin in c for c in config["setup_commands"]) for pin in makefile_torch)
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--object-store-memory" in head_start and "object_spilling_config" in head_start
    spill = json.loads(json.loads(re.search(r"--system-config='(.+?)'", head_start).group(1))["object_spilling_config"])
    assert any(spill["params"]["directory_path"] in c for c in config["setup_commands"]), (
        "the spill folder is made on every node"
    )
    assert "--dashboard-host=0.0.0.0" in head_start, "the Jobs API must be reachable for ray job submit"
