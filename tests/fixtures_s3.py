"""Session fixture: a real S3 API (moto's server) on loopback, for the publish tests.

moto's ``ThreadedMotoServer`` runs the S3 REST API in a thread of the test process on
127.0.0.1 and a free port; boto3 talks to it over HTTP exactly as it talks to AWS.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

__all__ = ["S3Server", "s3_server"]


@dataclass(frozen=True)
class S3Server:
    """A running S3 endpoint.

    Attributes:
        endpoint_url: ``http://127.0.0.1:<port>``.
        region: the region buckets are created in.
    """

    endpoint_url: str
    region: str = "us-east-1"

    def client(self, **credentials: str):  # type: ignore[no-untyped-def]
        """A boto3 S3 client for this server (any credentials are accepted)."""
        import boto3

        creds = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing", **credentials}
        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name=self.region, **creds)

    def create_bucket(self, name: str) -> str:
        """Create ``name`` (idempotent) and return it."""
        client = self.client()
        existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
        if name not in existing:
            client.create_bucket(Bucket=name)
        return name


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """moto's S3 server on 127.0.0.1, started once per session and stopped at its end."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield S3Server(endpoint_url=f"http://127.0.0.1:{port}")
    finally:
        server.stop()
