"""Local object stores for tests: a GCS emulator (gcp-storage-emulator) and an S3 one (moto in server
mode), each a subprocess on a free 127.0.0.1 port, plus the environment that points every library at
it (fsspec's gcsfs / s3fs, and TensorStore, through which Orbax writes arrays).

`python tests/storage_emulators.py gcs PORT BUCKET` runs the GCS emulator. Real GCS sends an object's
generation (x-goog-generation) with its bytes; the emulator leaves it out, and TensorStore refuses a
download without one, so the launcher adds it to the emulator's download handler.
"""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BUCKET = "bucket"
# fake credentials for the S3 emulator (moto accepts any); no cloud is reachable with them
S3_KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
           "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _log():
    """The emulator's log: a file, as a pipe nobody reads would fill and block the server."""
    import tempfile

    return tempfile.TemporaryFile("w+")


def _wait(url: str, proc: subprocess.Popen, log, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"emulator exited early ({proc.returncode}): {log.read()[-2000:]}")
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"emulator at {url} not ready after {timeout} s")


@contextlib.contextmanager
def gcs_emulator(bucket: str = BUCKET):
    """Yields the environment (STORAGE_EMULATOR_HOST) for a running GCS emulator holding `bucket`."""
    port = free_port()
    log = _log()
    proc = subprocess.Popen([sys.executable, __file__, "gcs", str(port), bucket], stdout=log, stderr=log)
    host = f"http://127.0.0.1:{port}"
    try:
        _wait(f"{host}/storage/v1/b", proc, log)
        yield {"STORAGE_EMULATOR_HOST": host}
    finally:
        proc.kill()
        proc.wait()
        log.close()


@contextlib.contextmanager
def s3_emulator(bucket: str = BUCKET):
    """Yields the environment (AWS_ENDPOINT_URL and test keys) for a running moto server holding
    `bucket`."""
    port = free_port()
    log = _log()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait(f"{url}/moto-api/", proc, log)
        req = urllib.request.Request(f"{url}/{bucket}", method="PUT")
        urllib.request.urlopen(req, timeout=10).read()
        yield {"AWS_ENDPOINT_URL": url, **S3_KEYS}
    finally:
        proc.kill()
        proc.wait()
        log.close()


def _serve_gcs(port: int, bucket: str) -> None:
    import gcp_storage_emulator.handlers.objects as objects

    plain = objects.download

    def download(request, response, storage, *args, **kwargs):
        plain(request, response, storage, *args, **kwargs)
        with contextlib.suppress(Exception):  # a missing object already answered 404
            obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
            response["x-goog-generation"] = str(obj["generation"])
            response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))

    objects.download = download  # before the server module binds its routes
    from gcp_storage_emulator.server import create_server

    server = create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket)
    server.start()
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    _serve_gcs(int(sys.argv[2]), sys.argv[3])
