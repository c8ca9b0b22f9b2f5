"""Shared helpers of the publish tests: what a publish must deliver, and what S3 holds."""

from __future__ import annotations

import hashlib
from typing import Any

from flagrelease.bundle import load_manifest
from flagrelease.pipeline import ReleaseContext
from flagrelease.publish.s3 import RELEASE_POINTER
from tests.fixtures_s3 import S3Server

__all__ = ["HF_REPO", "MIB", "MS_REPO", "bundle_objects", "expected", "objects", "s3_target", "sha"]

MIB = 1024 * 1024
HF_REPO = "FlagRelease/Tiny-Qwen2-FlagOS-CPU-INT8"
MS_REPO = "FlagRelease/Tiny-Qwen2-FlagOS-CPU-INT8"


def sha(data: bytes) -> str:
    """The sha256 (hex) of ``data``."""
    return hashlib.sha256(data).hexdigest()


def expected(ctx: ReleaseContext) -> dict[str, str]:
    """path -> sha256 of everything a publish must deliver: the bundle, then the converted weights."""
    m = load_manifest(ctx.layout.manifest_path)
    out = {f["path"]: f["sha256"] for f in m["weights"]["files"]}
    out.update({f["path"]: f["sha256"] for f in m["files"]})
    out["flagrelease.json"] = sha(ctx.layout.manifest_path.read_bytes())
    return out


def s3_target(s3_server: S3Server, bucket: str, prefix: str = "releases/tiny") -> dict[str, Any]:
    """The ``publish.s3`` section of a fresh bucket on the test server."""
    s3_server.create_bucket(bucket)
    return {"bucket": bucket, "prefix": prefix, "endpoint_url": s3_server.endpoint_url}


def objects(s3_server: S3Server, bucket: str, prefix: str) -> dict[str, bytes]:
    """Every object below ``prefix`` (the release pointer included), by path below it."""
    client = s3_server.client()
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
        for obj in page.get("Contents", []):
            out[obj["Key"][len(prefix) + 1 :]] = client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
    return out


def bundle_objects(s3_server: S3Server, bucket: str, prefix: str) -> dict[str, bytes]:
    """The bundle's objects below ``prefix``: all of them but the release pointer."""
    return {k: v for k, v in objects(s3_server, bucket, prefix).items() if k != RELEASE_POINTER}
