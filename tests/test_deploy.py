"""docker-compose.yml's "replicas" profile and deploy/haproxy.cfg agree: the proxy is given
exactly the variables the config reads, each replica it names is a backend service of the
profile, and `haproxy -c` accepts the config with those values (tests/integration/
test_two_hosts.py runs it in front of two real replicas)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_the_proxy_service_sets_every_variable_the_config_reads() -> None:
    config = (ROOT / "deploy" / "haproxy.cfg").read_text()
    used = set(re.findall(r"\$\{([A-Z_]+)\}", config))
    proxy = _compose()["services"]["proxy"]
    # HEALTH_AUTH is made at start from the basic-auth pair, which the backends get too.
    assert used == {"PROXY_BIND", "REPLICA_A", "REPLICA_B", "HEALTH_AUTH"}
    assert set(proxy["environment"]) == used - {"HEALTH_AUTH"} | {
        "BASIC_AUTH_USER",
        "BASIC_AUTH_PASS",
    }
    command = " ".join(proxy["command"])
    assert (
        'HEALTH_AUTH="$$(printf' in command and '"$$BASIC_AUTH_USER" "$$BASIC_AUTH_PASS"' in command
    )
    assert "exec haproxy" in command and "/usr/local/etc/haproxy/haproxy.cfg" in command
    backend_env = _compose()["x-backend-env"]
    assert proxy["environment"]["BASIC_AUTH_USER"] == backend_env["BASIC_AUTH_USER"]
    assert proxy["environment"]["BASIC_AUTH_PASS"] == backend_env["BASIC_AUTH_PASS"]
    assert "./deploy/haproxy.cfg:/usr/local/etc/haproxy/haproxy.cfg:ro" in proxy["volumes"]


def test_every_replica_the_proxy_names_is_a_backend_service_on_its_port() -> None:
    services = _compose()["services"]
    proxy = services["proxy"]
    replicas = [v for k, v in proxy["environment"].items() if k.startswith("REPLICA_")]
    assert len(replicas) == 2
    for address in replicas:
        name, port = address.split(":")
        service = services[name]
        assert service.get("image") == "stable-sam-backend"
        assert "command" not in service  # the backend, not a worker
        assert port == "9090"
        assert set(proxy["depends_on"]) >= {name}
    assert services["backend-b"]["profiles"] == proxy["profiles"] == ["replicas"]


def test_haproxy_accepts_the_config_with_the_compose_values() -> None:
    binary = shutil.which("haproxy")
    assert binary is not None, "haproxy is not installed (scripts/test.sh installs it)"
    env = dict(_compose()["services"]["proxy"]["environment"], HEALTH_AUTH="dTpw")
    # The service names resolve only inside compose's network: the same ports on loopback.
    for key in ("REPLICA_A", "REPLICA_B"):
        env[key] = "127.0.0.1:" + env[key].split(":")[1]
    check = subprocess.run(
        [binary, "-c", "-f", str(ROOT / "deploy" / "haproxy.cfg")],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert check.returncode == 0, check.stdout + check.stderr
