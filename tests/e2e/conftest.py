"""Session fixtures for end-to-end tests: one real Label Studio per test session, shared.

- ``label_studio``: a running ``label-studio==1.23.2`` (see ``harness.LabelStudioServer``);
  installing it or migrating its template fails the test with the reason, never skips it.
- ``ls_client``: its REST API, authenticated with a personal access token.
- ``start_backend``: starts our backend as a subprocess with the given settings; every backend
  started is stopped at the end of the session.

Tests that use these must be marked ``@pytest.mark.e2e``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest

from .harness import BackendServer, HarnessError, LabelStudioDriver, LabelStudioServer


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabelStudioServer]:
    """A real Label Studio on 127.0.0.1 for the whole session (fresh data dir, admin, PAT)."""
    try:
        server = LabelStudioServer.start(tmp_path_factory.mktemp("label-studio"))
    except HarnessError as error:
        pytest.fail(f"could not start Label Studio: {error}", pytrace=False)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def ls_client(label_studio: LabelStudioServer) -> Iterator[LabelStudioDriver]:
    """Label Studio's REST API as the admin, through a personal access token."""
    client = label_studio.client()
    try:
        yield client
    finally:
        client.close()


BackendFactory = Callable[[str, Mapping[str, str]], BackendServer]


@pytest.fixture(scope="session")
def start_backend(
    tmp_path_factory: pytest.TempPathFactory, redis_url: str
) -> Iterator[BackendFactory]:
    """``start_backend(name, settings_env) -> BackendServer``: our backend as a real process.

    ``settings_env`` are the backend's environment settings (``LABEL_STUDIO_URL``, ...); the
    harness adds a private ``REDIS_URL`` and ``VERSIONS_DIR`` unless given, and passes nothing
    else from the test environment.
    """
    root = tmp_path_factory.mktemp("backends")
    started: list[BackendServer] = []

    def start(name: str, settings_env: Mapping[str, str]) -> BackendServer:
        workdir: Path = root / name
        env = {
            "REDIS_URL": redis_url,
            "VERSIONS_DIR": str(workdir / "versions"),
            "LOG_LEVEL": "INFO",
            **settings_env,
        }
        try:
            server = BackendServer.start(workdir, env, name=name)
        except HarnessError as error:
            pytest.fail(f"could not start the backend: {error}", pytrace=False)
        started.append(server)
        return server

    try:
        yield start
    finally:
        for server in started:
            server.stop()
