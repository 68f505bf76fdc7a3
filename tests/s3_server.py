"""A real S3-compatible server on 127.0.0.1 for tests: moto's server mode in a thread of this process.

``s3_server`` (module scope) starts it on a free port and points every S3 client at it the way a
user points prefloop at a bucket: through the standard AWS environment variables (endpoint
``AWS_ENDPOINT_URL_S3``, fake keys, a region), never through a store URI, config or manifest.
The server speaks HTTP, so everything in between (s3fs, aiobotocore, signing, multipart uploads,
conditional writes) is exercised, not mocked. ``s3_bucket`` gives each test an empty bucket and its
``s3://`` root. Import both into a test module::

    from s3_server import s3_bucket, s3_server  # noqa: F401  (pytest fixtures)
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

# Fake keys: moto accepts any; what matters is that they come from the environment only.
FAKE_KEY_ID = "AKIAPREFLOOPTESTKEY01"
FAKE_SECRET = "prefloop-test-secret-not-a-real-key-000"


@dataclass(frozen=True)
class S3Server:
    endpoint: str

    def client(self):  # a boto3 client on the same server, to poke at objects behind the store's back
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def s3_server() -> Iterator[S3Server]:
    pytest.importorskip("s3fs", reason="s3fs is a dev dependency: pip install -e '.[dev]'")
    server_module = pytest.importorskip("moto.server", reason="moto[server] is a dev dependency")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    port = _free_port()
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ENDPOINT_URL_S3": endpoint,
        "AWS_ACCESS_KEY_ID": FAKE_KEY_ID,
        "AWS_SECRET_ACCESS_KEY": FAKE_SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    from s3fs import S3FileSystem

    S3FileSystem.clear_instance_cache()  # no client made before the endpoint was set
    try:
        yield S3Server(endpoint)
    finally:
        S3FileSystem.clear_instance_cache()  # none left pointing at a stopped server
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.stop()


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> str:
    """A fresh, empty bucket; returns the store root ``s3://<bucket>/store``."""
    name = f"prefloop-{uuid.uuid4().hex[:12]}"
    s3_server.client().create_bucket(Bucket=name)
    return f"s3://{name}/store"
