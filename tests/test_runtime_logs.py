"""runtime.logs.configure_logging: one format and token redaction in every process (the web
app, the training worker and RQ's lines in it, the CLIs)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# "2026-01-31 12:00:00,123 INFO name: message"
LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR) [\w.]+: ")
SECRET = "abcdef0123456789abcdef"


def run_python(code: str) -> list[str]:
    """The stderr lines of a fresh interpreter running ``code``."""
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stderr.splitlines()


def test_a_configured_process_logs_one_format_and_never_a_token() -> None:
    lines = run_python(
        "import logging\n"
        "from runtime.logs import configure_logging\n"
        "configure_logging('info')\n"
        f"logging.getLogger('training.jobs').info('sent %s', 'Bearer {SECRET}')\n"
        "logging.getLogger('training.jobs').debug('not at INFO')\n"
    )
    assert len(lines) == 1, lines
    assert LINE.match(lines[0]) and lines[0].split(": ", 1)[0].endswith("INFO training.jobs")
    assert SECRET not in lines[0]


def test_rq_logs_through_the_configured_handler_once() -> None:
    # RQ adds handlers of its own (another format, no redaction) only when none is configured.
    lines = run_python(
        "import logging\n"
        "from rq.logutils import setup_loghandlers\n"
        "from runtime.logs import configure_logging\n"
        "configure_logging('INFO')\n"
        "setup_loghandlers('INFO', name='rq.worker')\n"
        f"logging.getLogger('rq.worker').info('job with token {SECRET}')\n"
    )
    assert len(lines) == 1, lines
    assert LINE.match(lines[0]) and SECRET not in lines[0]


@pytest.mark.integration
def test_the_training_worker_logs_rq_s_lines_in_the_one_format(redis_url: str) -> None:
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "REDIS_URL": redis_url,
        "TRAINING_QUEUE": f"logs-{uuid.uuid4().hex[:8]}",
    }
    worker = subprocess.Popen(
        [sys.executable, "-m", "training.worker", "--name", f"logs-{uuid.uuid4().hex[:8]}"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert worker.stdout is not None
        deadline = time.monotonic() + 60
        started = None
        while started is None and time.monotonic() < deadline:
            line = worker.stdout.readline()
            if not line:
                break
            if "started with PID" in line:
                started = line.rstrip("\n")
        assert started is not None, "the worker never said it started"
        assert LINE.match(started) and " INFO rq.worker: " in started, started
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=30)
