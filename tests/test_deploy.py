"""docker-compose.yml's "replicas" profile and deploy/haproxy.cfg agree: the proxy is given
exactly the variables the config reads, each replica it names is a backend service of the
profile, and `haproxy -c` accepts the config with those values (tests/integration/
test_two_hosts.py runs it in front of two real replicas). And the image's checkpoint downloads
(deploy/checkpoints.py): each verified against a pinned SHA-256, an unpinned one refused."""

from __future__ import annotations

import hashlib
import importlib.util
import re
import shutil
import subprocess
import sys
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


# --- deploy/checkpoints.py: every checkpoint the image downloads is verified ------------------

CHECKPOINTS_SCRIPT = ROOT / "deploy" / "checkpoints.py"


def _fetch(args: list[str], hashes: str = "") -> subprocess.CompletedProcess:
    """Run the script as the Dockerfile does (no network: the tests fetch file:// mirrors)."""
    env = {"PATH": "/usr/bin:/bin", "SAM_CHECKPOINT_SHA256": hashes}
    return subprocess.run(
        [sys.executable, str(CHECKPOINTS_SCRIPT), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _checkpoints() -> dict:
    """The script's ``CHECKPOINTS`` (it is not a package module: the image copies it alone)."""
    spec = importlib.util.spec_from_file_location("checkpoints", CHECKPOINTS_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["checkpoints"] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module.CHECKPOINTS


def _pins() -> dict[str, str | None]:
    return {name: c.sha256 for name, c in _checkpoints().items()}


def test_the_dockerfile_downloads_only_through_the_verifying_script() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "COPY deploy/checkpoints.py" in dockerfile
    assert "python deploy/checkpoints.py --dest /models ${SAM_CHECKPOINTS}" in dockerfile
    code = "\n".join(line for line in dockerfile.splitlines() if not line.startswith("#"))
    for other_download in ("curl -", "wget ", "dl.fbaipublicfiles", "huggingface.co", "github"):
        assert other_download not in code
    named = re.search(r"SAM_CHECKPOINTS \(space-separated: ([a-z0-9_. \n#]+)\)", dockerfile)
    assert set(named.group(1).replace("#", " ").split()) == set(_pins())


def test_every_pin_is_a_full_sha256_and_mobile_sam_is_pinned() -> None:
    pins = _pins()
    assert {"vit_b", "vit_l", "vit_h", "vit_t"} <= {k for k, v in pins.items() if v}
    for name, pin in pins.items():
        assert pin is None or re.fullmatch(r"[0-9a-f]{64}", pin), name


def test_every_official_sam2_base_is_downloadable_and_pinned() -> None:
    from stable_sam import SAM2_MODEL_TYPES

    checkpoints = _checkpoints()
    for model_type in SAM2_MODEL_TYPES:
        checkpoint = checkpoints[model_type]
        assert checkpoint.sha256 and "micro_sam/v2/util.py" in checkpoint.source, model_type
        # Named as sam2 names its checkpoints, the model type's file (stable_sam/sam2_base.py).
        assert checkpoint.filename == f"{model_type}.pt"
        assert checkpoint.url.startswith("https://dl.fbaipublicfiles.com/segment_anything_2/")


def test_a_download_that_does_not_match_its_pin_is_refused_and_removed(tmp_path: Path) -> None:
    fake = tmp_path / "fake.pt"
    fake.write_bytes(b"not MobileSAM")
    dest = tmp_path / "models"
    run = _fetch(["--dest", str(dest), "--url", f"vit_t={fake.as_uri()}", "vit_t"])
    assert run.returncode == 1
    assert "mobile_sam.pt" in run.stderr and "does not match" in run.stderr
    assert "6dbb90523a35330fedd7f1d3dfc66f995213d81b29a5ca8108dbcdd4e37d6c2f" in run.stderr
    assert list(dest.iterdir()) == []  # neither the file nor its partial download is left


def test_a_download_that_matches_the_hash_it_was_given_is_kept(tmp_path: Path) -> None:
    payload = tmp_path / "hq.pth"
    payload.write_bytes(b"an HQ-SAM checkpoint")
    sha = hashlib.sha256(payload.read_bytes()).hexdigest()
    dest = tmp_path / "models"
    args = ["--dest", str(dest), "--url", f"hq_vit_b={payload.as_uri()}", "hq_vit_b"]
    run = _fetch(args, hashes=f"hq_vit_b={sha}")
    assert run.returncode == 0, run.stderr
    assert [p.name for p in dest.iterdir()] == ["sam_hq_vit_b.pth"]
    assert (dest / "sam_hq_vit_b.pth").read_bytes() == payload.read_bytes()


def test_a_name_without_a_pin_is_refused_before_anything_is_downloaded(tmp_path: Path) -> None:
    payload = tmp_path / "hq.pth"
    payload.write_bytes(b"an HQ-SAM checkpoint")
    dest = tmp_path / "models"
    # vit_t first: the unpinned name is refused before the pinned one is fetched either.
    args = ["--dest", str(dest), "--url", f"hq_vit_l={payload.as_uri()}", "vit_t", "hq_vit_l"]
    run = _fetch(args)
    assert run.returncode == 1
    assert "no pinned SHA-256 for hq_vit_l" in run.stderr
    assert "SAM_CHECKPOINT_SHA256='hq_vit_l=<sha256 of the file>'" in run.stderr
    assert "mount the file" in run.stderr
    assert not dest.exists() and "fetching" not in run.stdout


def test_a_given_hash_never_overrides_a_pin(tmp_path: Path) -> None:
    run = _fetch(["--dest", str(tmp_path), "vit_b"], hashes=f"vit_b={'0' * 64}")
    assert run.returncode == 1 and "its pin is ec2df627" in run.stderr


def test_an_unknown_name_is_refused(tmp_path: Path) -> None:
    run = _fetch(["--dest", str(tmp_path), "vit_q"])
    assert run.returncode == 1 and "unknown checkpoint 'vit_q'" in run.stderr
