"""A real Label Studio and a real backend process, for end-to-end tests.

``LabelStudioServer`` runs ``label-studio==LS_VERSION`` from its own virtual environment
(``.venv-ls``, made by ``scripts/install_label_studio.sh``) on 127.0.0.1 and a free port, in a
fresh data dir copied from a migrated template (``.cache/label-studio/<version>/template``, made
once: a fresh sqlite DB spends ~50 s in migrations). ``LabelStudioDriver`` talks to its REST API
through the service's own adapter (``labelstudio.client.LabelStudioClient``, a personal access
token exchanged for short-lived access tokens), plus the calls only these tests make.
``BackendServer`` runs our backend (``uvicorn backend.app:create_app --factory``) as a
subprocess on another free port. Region builders produce the context the browser sends to
``/api/ml/{id}/interactive-annotating``.

Everything here fails loudly (``HarnessError`` with the log tail of the process concerned, or the
adapter's ``LabelStudioError`` for an API call); nothing is skipped.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from labelstudio.auth import LabelStudioAuth
from labelstudio.client import LabelStudioClient
from labelstudio.download import DownloadLimits
from labelstudio.regions import rectangle_region as labelstudio_rectangle
from labelstudio.regions import result_region
from runtime.logs import configure_logging

logger = logging.getLogger(__name__)

LS_VERSION = "1.23.2"
REPO_ROOT = Path(__file__).resolve().parents[2]
LS_VENV = REPO_ROOT / ".venv-ls"
LS_CACHE = REPO_ROOT / ".cache" / "label-studio"
INSTALL_SCRIPT = REPO_ROOT / "scripts" / "install_label_studio.sh"

ADMIN_EMAIL = "admin@example.com"
ADMIN_PASSWORD = "e2e-admin-password"  # a throwaway server on loopback
ADMIN_LEGACY_TOKEN = "e2e0legacy0token0for0tests0only0000000000"

# Environment variables a child process may inherit; everything else is dropped, so a stray
# HOST, PORT, USERNAME, LABEL_STUDIO_* or a developer's backend settings cannot leak into
# Label Studio (it reads many settings unprefixed) or into the backend under test.
INHERITED_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "TZ", "SSL_CERT_FILE")

# Label Studio settings for a server on loopback that talks to a backend on loopback (DESIGN §3).
LS_TEST_ENV = {
    "ML_BLOCK_LOCAL_IP": "false",
    "SSRF_PROTECTION_ENABLED": "false",
    "SENTRY_DSN": "",
    "FRONTEND_SENTRY_DSN": "",
    "LATEST_VERSION_CHECK": "false",
    "COLLECT_ANALYTICS": "false",
    "LABEL_STUDIO_USERNAME": ADMIN_EMAIL,
    "LABEL_STUDIO_PASSWORD": ADMIN_PASSWORD,
    "LABEL_STUDIO_USER_TOKEN": ADMIN_LEGACY_TOKEN,
    "PYTHONUNBUFFERED": "1",
}

INSTALL_TIMEOUT_S = 900.0
MIGRATE_TIMEOUT_S = 600.0
START_TIMEOUT_S = 180.0
BACKEND_START_TIMEOUT_S = 120.0
REQUEST_TIMEOUT_S = 120.0  # an interactive prediction may build the model first, on a busy CPU


class HarnessError(RuntimeError):
    """Label Studio or the backend could not be installed, started or driven."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """A minimal child environment: ``INHERITED_ENV`` from ours plus ``extra``."""
    env = {key: os.environ[key] for key in INHERITED_ENV if key in os.environ}
    env.update(extra or {})
    return env


def log_tail(path: Path, lines: int = 40) -> str:
    """The last ``lines`` lines of a log file, for error messages."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:])


def wait_until(
    ready: Callable[[], bool],
    timeout_s: float,
    what: str,
    process: subprocess.Popen | None = None,
    log_path: Path | None = None,
) -> float:
    """Poll ``ready`` until it is true; return the seconds waited. Fails early if ``process`` dies."""
    start = time.monotonic()
    while True:
        if ready():
            return time.monotonic() - start
        if process is not None and process.poll() is not None:
            tail = log_tail(log_path) if log_path else ""
            raise HarnessError(f"{what}: process exited with {process.returncode}\n{tail}")
        if time.monotonic() - start > timeout_s:
            tail = log_tail(log_path) if log_path else ""
            raise HarnessError(f"{what}: not ready after {timeout_s:.0f} s\n{tail}")
        time.sleep(0.2)


def _answers_health(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


def stop_process(process: subprocess.Popen, grace_s: float = 10.0) -> None:
    """Terminate ``process`` and its process group; kill it if it does not exit in time."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, 15)
    except ProcessLookupError:
        return
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, 9)
        process.wait()


# --------------------------------------------------------------------------------------------
# Label Studio: install, migrated template, server
# --------------------------------------------------------------------------------------------


def ensure_label_studio(version: str = LS_VERSION) -> Path:
    """Install Label Studio into ``.venv-ls`` if needed; return its ``label-studio`` executable.

    Runs ``scripts/install_label_studio.sh`` (idempotent, well under a second when installed).
    """
    executable = LS_VENV / "bin" / "label-studio"
    env = clean_env({"LABEL_STUDIO_VERSION": version, "LABEL_STUDIO_VENV": str(LS_VENV)})
    start = time.monotonic()
    LS_CACHE.mkdir(parents=True, exist_ok=True)
    with _file_lock(LS_CACHE / "install.lock"):
        try:
            result = subprocess.run(
                ["bash", str(INSTALL_SCRIPT)],
                env=env,
                capture_output=True,
                text=True,
                timeout=INSTALL_TIMEOUT_S,
                check=False,
            )
        except subprocess.TimeoutExpired as error:
            raise HarnessError(
                f"installing label-studio=={version} took over {error.timeout} s"
            ) from error
    if result.returncode != 0 or not executable.exists():
        raise HarnessError(
            f"could not install label-studio=={version} with {INSTALL_SCRIPT} "
            f"(exit {result.returncode}):\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
        )
    logger.info("label-studio %s ready in %.1f s", version, time.monotonic() - start)
    return executable


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``path``, so parallel test sessions share one install/template."""
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def migrated_template(executable: Path, version: str = LS_VERSION) -> Path:
    """A data dir whose sqlite DB has every migration applied, cached per LS version.

    Made once with ``label-studio version --data-dir D`` (applies the migrations and exits); later
    sessions copy it and start in seconds.
    """
    root = LS_CACHE / version
    template = root / "template"
    root.mkdir(parents=True, exist_ok=True)
    with _file_lock(root / "template.lock"):
        if (template / "label_studio.sqlite3").exists():
            return template
        building = Path(tempfile.mkdtemp(prefix="template-", dir=root))
        log_path = root / "migrate.log"
        start = time.monotonic()
        with open(log_path, "w") as log:
            try:
                result = subprocess.run(
                    [str(executable), "version", "--data-dir", str(building)],
                    env=clean_env(LS_TEST_ENV),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    timeout=MIGRATE_TIMEOUT_S,
                    check=False,
                )
                failed = result.returncode != 0
            except subprocess.TimeoutExpired:
                failed = True
        if failed or not (building / "label_studio.sqlite3").exists():
            shutil.rmtree(building, ignore_errors=True)
            raise HarnessError(f"label-studio migrations failed:\n{log_tail(log_path)}")
        building.rename(template)
        logger.info("migrated Label Studio template in %.1f s", time.monotonic() - start)
        return template


@dataclass
class LabelStudioServer:
    """A running Label Studio on 127.0.0.1.

    ``url``: base URL (no trailing slash); ``legacy_token``: the admin's legacy API token;
    ``personal_access_token``: a PAT created through the API (a JWT refresh token).
    ``timings``: seconds spent per phase (install, template, copy, start, bootstrap).
    """

    url: str
    data_dir: Path
    log_path: Path
    process: subprocess.Popen
    legacy_token: str = ADMIN_LEGACY_TOKEN
    personal_access_token: str = ""
    timings: dict[str, float] = field(default_factory=dict)

    @classmethod
    def start(cls, workdir: Path, version: str = LS_VERSION) -> LabelStudioServer:
        """Install (if needed), copy the migrated template into ``workdir``, start, bootstrap."""
        timings: dict[str, float] = {}
        t0 = time.monotonic()
        executable = ensure_label_studio(version)
        timings["install"] = time.monotonic() - t0

        t0 = time.monotonic()
        template = migrated_template(executable, version)
        timings["template"] = time.monotonic() - t0

        t0 = time.monotonic()
        data_dir = workdir / "label-studio-data"
        shutil.copytree(template, data_dir)
        timings["copy"] = time.monotonic() - t0

        port = free_port()
        url = f"http://127.0.0.1:{port}"
        log_path = workdir / "label-studio.log"
        command = [
            str(executable),
            "start",
            "--no-browser",
            "--data-dir",
            str(data_dir),
            "--internal-host",
            "127.0.0.1",
            "--port",
            str(port),
        ]
        t0 = time.monotonic()
        with open(log_path, "w") as log:
            process = subprocess.Popen(
                command,
                env=clean_env(LS_TEST_ENV),
                cwd=workdir,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: teardown kills workers too
            )
        server = cls(url=url, data_dir=data_dir, log_path=log_path, process=process)
        try:
            wait_until(
                lambda: _answers_health(url),
                START_TIMEOUT_S,
                "label-studio start",
                process,
                log_path,
            )
            timings["start"] = time.monotonic() - t0
            t0 = time.monotonic()
            server.personal_access_token = server._create_personal_access_token()
            timings["bootstrap"] = time.monotonic() - t0
        except BaseException:
            server.stop()
            raise
        server.timings = timings
        logger.info("label-studio on %s; phases (s): %s", url, _rounded(timings))
        return server

    def _create_personal_access_token(self) -> str:
        """Log in through the web form and create a PAT for the admin.

        Label Studio 1.23 disables legacy tokens for new organisations, so a browser session is
        the only credential a fresh install accepts besides PATs.
        """
        return _personal_access_token_via_session(self.url, ADMIN_EMAIL, ADMIN_PASSWORD)

    def add_user(self, email: str, password: str = ADMIN_PASSWORD) -> LabelStudioDriver:
        """Sign a new member up through the organisation's invite link (as an invited
        annotator would) and return a client acting as that user (its own PAT)."""
        with self.client() as admin:
            invite = admin.request("GET", "/api/invite").json()
        token = _personal_access_token_via_session(
            self.url, email, password, signup_token=invite["token"]
        )
        return LabelStudioDriver(self.url, token)

    def client(self) -> LabelStudioDriver:
        """A REST client authenticated with the personal access token."""
        return LabelStudioDriver(self.url, self.personal_access_token)

    def stop(self) -> None:
        """Stop the server and everything it started."""
        stop_process(self.process)


def _rounded(timings: Mapping[str, float]) -> dict[str, float]:
    return {key: round(value, 1) for key, value in timings.items()}


def _personal_access_token_via_session(
    url: str, email: str, password: str, signup_token: str | None = None
) -> str:
    """Log in (or sign up with the organisation's invite ``signup_token``) through the web form,
    as a browser does, and create a personal access token with that session."""
    page = "/user/signup/" if signup_token else "/user/login/"
    params = {"token": signup_token} if signup_token else {}
    with httpx.Client(base_url=url, timeout=30.0) as web:
        web.get(page, params=params).raise_for_status()
        csrf = web.cookies.get("csrftoken")
        if not csrf:
            raise HarnessError(f"label-studio {page} set no csrftoken cookie")
        form = {"email": email, "password": password, "csrfmiddlewaretoken": csrf}
        answer = web.post(page, params=params, data=form, headers={"Referer": f"{url}{page}"})
        if "sessionid" not in web.cookies:
            raise HarnessError(f"label-studio {page} as {email} failed (HTTP {answer.status_code})")
        headers = {"X-CSRFToken": web.cookies.get("csrftoken") or csrf, "Referer": url}
        created = web.post("/api/token/", headers=headers)
        if created.status_code != 201:
            raise HarnessError(
                f"creating a personal access token failed: HTTP {created.status_code} "
                f"{created.text[:300]}"
            )
        return created.json()["token"]


# --------------------------------------------------------------------------------------------
# REST client
# --------------------------------------------------------------------------------------------


@dataclass
class ImportedTask:
    """A task created by uploading one image: ``id`` and ``image_url`` (``/data/upload/...``)."""

    id: int
    image_url: str
    file_name: str


class LabelStudioDriver(LabelStudioClient):
    """The adapter's client, plus the calls only the end-to-end tests make: organisation
    settings, ML backends and what the labeling page posts."""

    def __init__(self, base_url: str, personal_access_token: str) -> None:
        auth = LabelStudioAuth(base_url, personal_access_token)
        super().__init__(auth, DownloadLimits(timeout_s=REQUEST_TIMEOUT_S))

    def set_legacy_tokens(self, enabled: bool) -> None:
        """Enable or disable legacy API tokens for the organisation (Organization settings)."""
        settings = {"api_tokens_enabled": True, "legacy_api_tokens_enabled": enabled}
        self.request("POST", "/api/jwt/settings", json=settings)

    def import_images(self, project_id: int, images: Mapping[str, bytes]) -> list[ImportedTask]:
        """Upload image files (name -> encoded bytes, e.g. PNG) as tasks, in the given order.

        Label Studio stores each upload as ``/data/upload/<project>/<prefix>-<name>`` and makes one
        task per file; the returned tasks follow the order of ``images``.
        """
        self.import_files(project_id, images)
        tasks = self.tasks(project_id)
        ordered = []
        for name in images:
            matches = [t for t in tasks if _task_image(t).endswith(f"-{name}")]
            if len(matches) != 1:
                raise HarnessError(f"expected one task for {name}, found {len(matches)}")
            task = matches[0]
            ordered.append(ImportedTask(id=task["id"], image_url=_task_image(task), file_name=name))
        return ordered

    def connect_ml_backend(self, project_id: int, url: str, title: str = "stable-sam") -> dict:
        """Connect an interactive ML backend (Settings → Model → Connect Model).

        Label Studio checks ``/health`` and calls ``/setup`` before it answers.
        """
        created = self._call(
            "connecting an ML backend",
            lambda sdk: sdk.ml.create(
                url=url, project=project_id, title=title, is_interactive=True
            ),
        )
        return created.dict()

    def ml_backend(self, ml_backend_id: int) -> dict:
        """The ML backend's record (``state``, ``model_version``, ``error_message``, ...)."""
        return self._call("an ML backend", lambda sdk: sdk.ml.get(ml_backend_id)).dict()

    def train(self, ml_backend_id: int) -> None:
        """Press "Start Training" (LS sends ``START_TRAINING`` to the backend's /webhook)."""
        self._call("starting training", lambda sdk: sdk.ml.train(ml_backend_id))

    def model_versions(self, ml_backend_id: int) -> str:
        """What Label Studio answers for the ML backend's versions (it asks our /versions)."""
        return self.request("GET", f"/api/ml/{ml_backend_id}/versions").text

    def retrieve_predictions(self, project_id: int) -> dict:
        """Data Manager → select all → Actions → "Retrieve Predictions": Label Studio sends the
        tasks that hold no prediction of the backend's model version in batch ``/predict``."""
        path = f"/api/dm/actions?id=retrieve_tasks_predictions&project={project_id}"
        body = {"selectedItems": {"all": True, "excluded": []}}
        return self.request("POST", path, json=body).json()

    def interactive_annotating(self, ml_backend_id: int, task_id: int, regions: list[dict]) -> dict:
        """POST what the browser posts after a smart-tool region is drawn; returns LS's answer.

        Label Studio answers ``{"data": results[0]}`` on success and ``{"errors": [...]}`` (with
        HTTP 200) when the backend failed.
        """
        body = {"task": task_id, "context": {"result": regions}}
        path = f"/api/ml/{ml_backend_id}/interactive-annotating"
        return self.request("POST", path, json=body).json()


def _task_image(task: dict) -> str:
    data = task.get("data", {})
    return str(data.get("image", ""))


# --------------------------------------------------------------------------------------------
# Our backend as a subprocess
# --------------------------------------------------------------------------------------------


def start_worker(settings_env: Mapping[str, str], log_path: Path) -> subprocess.Popen:
    """``python -m training.worker`` (the deployment's worker) with exactly ``settings_env`` as
    its settings, logging to ``log_path``; stop it with ``stop_process``."""
    with open(log_path, "w") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "training.worker"],
            env=clean_env({"PYTHONPATH": str(REPO_ROOT), "PYTHONUNBUFFERED": "1", **settings_env}),
            cwd=REPO_ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


@dataclass
class BackendServer:
    """Our backend (``uvicorn backend.app:create_app --factory``) on 127.0.0.1:``port``."""

    url: str
    process: subprocess.Popen
    log_path: Path

    @classmethod
    def start(
        cls, workdir: Path, settings_env: Mapping[str, str], name: str = "backend"
    ) -> BackendServer:
        """Start the backend with exactly ``settings_env`` as its settings (plus PATH etc.)."""
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        workdir.mkdir(parents=True, exist_ok=True)
        log_path = workdir / f"{name}.log"
        command = [sys.executable, "-m", "uvicorn", "backend.app:create_app", "--factory"]
        command += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "info"]
        env = clean_env({"PYTHONUNBUFFERED": "1", **settings_env})
        with open(log_path, "w") as log:
            process = subprocess.Popen(
                command,
                env=env,
                cwd=REPO_ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        server = cls(url=url, process=process, log_path=log_path)
        try:
            waited = wait_until(
                lambda: _answers_health(url),
                BACKEND_START_TIMEOUT_S,
                f"{name} start",
                process,
                log_path,
            )
        except BaseException:
            server.stop()
            raise
        logger.info("%s on %s after %.1f s", name, url, waited)
        return server

    def stop(self) -> None:
        stop_process(self.process)


# --------------------------------------------------------------------------------------------
# Regions as the browser serialises them (LSF `serialize()` of the drawn regions)
# --------------------------------------------------------------------------------------------


def _manual(region: dict) -> dict:
    region["origin"] = "manual"  # drawn by a person
    return region


def keypoint_region(
    xy: tuple[float, float],
    size_wh: tuple[int, int],
    label: str,
    positive: bool = True,
    from_name: str = "tag",
    to_name: str = "image",
) -> dict:
    """A smart keypoint at pixel ``xy`` of an image of ``size_wh`` (W, H), in LS percent units."""
    width, height = size_wh
    value = {
        "x": 100.0 * xy[0] / width,
        "y": 100.0 * xy[1] / height,
        "width": 0.5,
        "keypointlabels": [label],
    }
    region = result_region("keypointlabels", value, from_name, to_name, width, height)
    region["is_positive"] = positive
    return _manual(region)


def rectangle_region(
    box_xyxy: Iterable[float],
    size_wh: tuple[int, int],
    label: str,
    from_name: str = "rect",
    to_name: str = "image",
) -> dict:
    """A smart rectangle over pixel box ``box_xyxy`` of an image of ``size_wh`` (W, H)."""
    width, height = size_wh
    return _manual(labelstudio_rectangle(tuple(box_xyxy), width, height, label, from_name, to_name))


def main(argv: list[str] | None = None) -> int:
    """``python -m tests.e2e.harness prepare``: install Label Studio and build the migrated
    template ahead of the tests (a separate, cacheable CI step)."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("command", choices=["prepare"])
    parser.add_argument("--version", default=LS_VERSION, help="label-studio version")
    args = parser.parse_args(argv)
    configure_logging("INFO")
    t0 = time.monotonic()
    executable = ensure_label_studio(args.version)
    t1 = time.monotonic()
    template = migrated_template(executable, args.version)
    t2 = time.monotonic()
    print(f"label-studio {args.version}: {executable} ({t1 - t0:.1f} s)")
    print(f"migrated template: {template} ({t2 - t1:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
