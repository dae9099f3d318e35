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
    assert any(f"{wheel}[attacks,demo]" in c for c in config["setup_commands"]), (
        f"setup_commands must install {wheel} with the extras the jobs use (adversarial, the sample images)"
    )
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


# Ports that run code for whoever reaches them: the dashboard with the Jobs API, and the GCS.
CODE_PORTS = (8265, 6379)
WORLD = ("0.0.0.0/0", "::/0")


def _ports(low, high) -> range:
    return range(int(low), int(high) + 1)


def world_openings(rule: dict) -> list[int]:
    """The CODE_PORTS an inbound rule opens to any address: an AWS IpPermission (FromPort/ToPort, IpProtocol -1 for
    every port, IpRanges/Ipv6Ranges) or a GCP firewall rule (allowed ports, sourceRanges)."""
    if "IpProtocol" in rule:
        sources = [r.get("CidrIp") for r in rule.get("IpRanges", [])] + [
            r.get("CidrIpv6") for r in rule.get("Ipv6Ranges", [])
        ]
        every = str(rule["IpProtocol"]) == "-1" or rule.get("FromPort", -1) == -1
        ports = range(65536) if every else _ports(rule["FromPort"], rule.get("ToPort", rule["FromPort"]))
    else:
        sources = rule.get("sourceRanges", [])
        ports = set()
        for allowed in rule.get("allowed", []):
            for spec in allowed.get("ports") or ["0-65535"]:  # no ports: every port of the protocol
                low, _, high = str(spec).partition("-")
                ports |= set(_ports(low, high or low))
    if not any(s in WORLD for s in sources):
        return []
    return [p for p in CODE_PORTS if p in ports]


def inbound_rules(node) -> list[dict]:
    """Every inbound rule anywhere in a launcher config (security-group permissions, firewall rules)."""
    if isinstance(node, list):
        return [r for item in node for r in inbound_rules(item)]
    if not isinstance(node, dict):
        return []
    own = [node] if "IpProtocol" in node or "sourceRanges" in node else []
    return own + [r for v in node.values() for r in inbound_rules(v)]


def test_the_rule_check_is_live():
    assert world_openings(
        {"IpProtocol": "tcp", "FromPort": 8000, "ToPort": 9000, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}
    )
    assert world_openings({"IpProtocol": "-1", "Ipv6Ranges": [{"CidrIpv6": "::/0"}]}) == [8265, 6379]
    assert not world_openings(
        {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22, "IpRanges": [{"CidrIp": "0.0.0.0/0"}]}
    )
    assert not world_openings({"IpProtocol": "-1", "IpRanges": [{"CidrIp": "10.0.0.0/8"}]})
    gcp = {"allowed": [{"IPProtocol": "tcp", "ports": ["6000-7000"]}], "sourceRanges": ["0.0.0.0/0"]}
    assert world_openings(gcp) == [6379] and world_openings({**gcp, "allowed": [{"IPProtocol": "all"}]})
    assert inbound_rules({"provider": {"firewall": [gcp]}}) == [gcp]


# What Ray's AWS launcher adds to the YAML's own rules (ray/autoscaler/_private/aws/config.py,
# _create_default_inbound_rules): all traffic between the cluster's groups, and SSH from anywhere.
RAY_AWS_DEFAULTS = [
    {"FromPort": -1, "ToPort": -1, "IpProtocol": "-1", "UserIdGroupPairs": [{"GroupId": "sg-cluster"}]},
    {"FromPort": 22, "ToPort": 22, "IpProtocol": "tcp", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]},
]


@pytest.mark.parametrize("name", CONFIGS)
def test_the_cluster_is_locked_down(name):
    """The dashboard (and its Jobs API, which runs any code) listens on the head only, every node runs with token
    authentication and holds the token, and no inbound rule opens 8265 or 6379 to the world."""
    config = _load(name)
    head_start = " ".join(config["head_start_ray_commands"])
    hosts = re.findall(r"--dashboard-host[= ](\S+)", head_start)
    assert hosts == ["127.0.0.1"], "the dashboard listens on the head only: users reach it through `ray dashboard`"
    starts = [c for c in config["head_start_ray_commands"] + config["worker_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 2 and all("export RAY_AUTH_MODE=token;" in c for c in starts), "token auth on every node"
    assert config["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token", "the token travels to the nodes"
    assert "0.0.0.0" not in json.dumps(config["head_start_ray_commands"] + config["worker_start_ray_commands"])
    rules = inbound_rules(config)
    if config["provider"]["type"] == "aws":
        assert config["provider"]["security_group"]["IpPermissions"] == rules
        rules = RAY_AWS_DEFAULTS + rules
    else:  # Ray's GCP launcher makes no firewall rules (the VPC's apply): the README states the requirement
        source = (Path(ray.autoscaler.__file__).parent / "_private" / "gcp" / "config.py").read_text()
        assert "firewall" not in source.lower()
    assert [p for r in rules for p in world_openings(r)] == []
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert "no firewall or security-group rule may open 8265 or 6379 to 0.0.0.0/0 or ::/0" in readme
