"""Publish to S3 (or any S3 API): staged, verified, then promoted; idempotent and resumable.

A release goes up in two steps (:class:`S3Destination`):

1. **Stage**: every file whose final object differs is uploaded below a staging prefix
   (``.flagrelease-staging/<prefix>/``, outside the final prefix), then downloaded back
   and checked against the manifest's sha256.  Nothing under the final prefix changes.
2. **Promote**: each staged object is copied server-side to the final prefix (the card
   and the manifest last), checked, and removed from staging; the release pointer
   (:data:`RELEASE_POINTER`: bundle name, manifest sha256, file count) is written last.

An interrupted or unverified publish therefore leaves the final prefix as it was (or, if
interrupted while promoting, without a new card, manifest or pointer); publishing again
completes it.  How each object goes up (resumable multipart uploads, checksums) is in
:mod:`flagrelease.publish._s3_upload`; :func:`publish_s3` uploads straight to a prefix.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flagrelease.config import S3Target
from flagrelease.errors import PublishError
from flagrelease.publish._s3_upload import (
    PartProgress,
    _client,
    _head,
    _matches,
    _s3_errors,
    _State,
    _transfer,
    _upload,
    publish_s3,
    s3_key,
)
from flagrelease.publish._types import Destination, DestinationResult, PlannedFile, check_sha256, sha256_of

__all__ = ["RELEASE_POINTER", "STAGING_ROOT", "PartProgress", "S3Destination", "publish_s3", "s3_key", "staging_target"]

log = logging.getLogger("flagrelease.publish.s3")

#: Objects up to this size are copied in one request (the S3 limit for CopyObject).
_COPY_MAX_SINGLE = 5 * 1024**3
_COPY_PART = 1024**3
#: The top-level folder of the staging prefixes.
STAGING_ROOT = ".flagrelease-staging"
#: The object written last below the final prefix: which bundle is published there, complete.
RELEASE_POINTER = "flagrelease-release.json"


def staging_target(target: S3Target) -> S3Target:
    """Where ``target``'s uploads are staged: ``.flagrelease-staging/<prefix>`` (``_root`` for the bucket root)."""
    return target.model_copy(update={"prefix": f"{STAGING_ROOT}/{target.prefix or '_root'}"})


def _copy(client: Any, bucket: str, src: str, dst: str, *, size: int, threshold: int, part_size: int) -> None:
    """Server-side copy ``src`` to ``dst`` keeping metadata and content type (in parts above ``threshold``)."""
    source = {"Bucket": bucket, "Key": src}
    if size <= threshold:
        # The copy gets its own full-object SHA-256: a staged multipart object carries a composite
        # one, which a reader would check the copy's bytes against (and fail).
        client.copy_object(
            Bucket=bucket, Key=dst, CopySource=source, MetadataDirective="COPY", ChecksumAlgorithm="SHA256"
        )
        return
    head = client.head_object(Bucket=bucket, Key=src)
    upload_id = client.create_multipart_upload(
        Bucket=bucket,
        Key=dst,
        ContentType=head.get("ContentType", "application/octet-stream"),
        Metadata=head["Metadata"],
    )["UploadId"]
    try:
        parts = []
        for number, start in enumerate(range(0, size, part_size), 1):
            end = min(start + part_size, size) - 1
            resp = client.upload_part_copy(
                Bucket=bucket,
                Key=dst,
                CopySource=source,
                CopySourceRange=f"bytes={start}-{end}",
                PartNumber=number,
                UploadId=upload_id,
            )
            parts.append({"PartNumber": number, "ETag": resp["CopyPartResult"]["ETag"]})
        client.complete_multipart_upload(Bucket=bucket, Key=dst, UploadId=upload_id, MultipartUpload={"Parts": parts})
    except BaseException:
        client.abort_multipart_upload(Bucket=bucket, Key=dst, UploadId=upload_id)
        raise


class S3Destination(Destination):
    """A bucket and prefix, staged below :data:`STAGING_ROOT` and promoted by server-side copies.

    Args:
        target: bucket, prefix, endpoint and region.
        credentials: boto3 client keyword arguments (empty: boto3's own chain).
        pointer: the release pointer's content (bundle name, manifest sha256, ...).
        transfer: a ``boto3.s3.transfer.TransferConfig``.
        state_path: where multipart upload ids are kept, so an interrupted upload resumes.
        on_part: called after each part of a multipart upload is stored.
        copy_threshold: objects above this many bytes are copied in parts of ``copy_part_size``.
    """

    name = "s3"

    def __init__(
        self,
        *,
        target: S3Target,
        credentials: Mapping[str, str],
        pointer: Mapping[str, Any],
        transfer: Any | None = None,
        state_path: Path | None = None,
        on_part: PartProgress | None = None,
        copy_threshold: int = _COPY_MAX_SINGLE,
        copy_part_size: int = _COPY_PART,
    ) -> None:
        self.target, self.staging = target, staging_target(target)
        self.credentials, self.pointer = dict(credentials), dict(pointer)
        self.config, self.state = _transfer(transfer), _State(state_path)
        self.on_part = on_part
        self.copy_threshold, self.copy_part_size = copy_threshold, copy_part_size
        self.url = f"s3://{target.bucket}/{target.prefix}".rstrip("/")
        self._staged: list[PlannedFile] = []

    def _download_sha256(self, client: Any, key: str) -> str:
        body = client.get_object(Bucket=self.target.bucket, Key=key)["Body"]
        try:
            return sha256_of(iter(lambda: body.read(8 << 20), b""))
        finally:
            body.close()

    def stage(self, files: list[PlannedFile]) -> DestinationResult:
        """Upload what differs from the final prefix into staging, then download it back and verify it."""
        result = DestinationResult(name=self.name, url=self.url, details={"parts_sent": 0, "parts_reused": 0})
        bucket = self.target.bucket
        with _s3_errors(self.url, self.target):
            client = _client(self.target, self.credentials)
            todo, final = [], []
            for f in files:
                if _matches(_head(client, bucket, s3_key(self.target, f.path)), f):
                    final.append(f.path)
                else:
                    todo.append(f)
            _upload(
                client, self.staging, todo, config=self.config, state=self.state, on_part=self.on_part, result=result
            )
            # Files already staged by an interrupted publish count as uploaded: they go public on promotion.
            result.skipped, result.uploaded = final, [f.path for f in todo]
            got = {f.path: self._download_sha256(client, s3_key(self.staging, f.path)) for f in todo}
            result.verified = check_sha256(got, todo, where=f"the staging prefix s3://{bucket}/{self.staging.prefix}")
        self._staged = todo
        return result

    def promote(self, result: DestinationResult) -> None:
        """Copy the staged objects to the final prefix (card and manifest last), then write the pointer."""
        from flagrelease.publish.hf import hf_batches

        bucket = self.target.bucket
        ordered = [f for batch in hf_batches(self._staged, max_bytes=1 << 62, max_files=1 << 30) for f in batch]
        with _s3_errors(self.url, self.target):
            client = _client(self.target, self.credentials)
            for f in ordered:
                src, dst = s3_key(self.staging, f.path), s3_key(self.target, f.path)
                _copy(
                    client, bucket, src, dst, size=f.size, threshold=self.copy_threshold, part_size=self.copy_part_size
                )
                if not _matches(_head(client, bucket, dst), f):
                    raise PublishError(
                        f"s3://{bucket}/{dst}: the copy from staging does not match its sha256; publish again"
                    )
                client.delete_object(Bucket=bucket, Key=src)
            body = (json.dumps(self.pointer, sort_keys=True, indent=2) + "\n").encode()
            sha = hashlib.sha256(body).hexdigest()
            key = s3_key(self.target, RELEASE_POINTER)
            if ((_head(client, bucket, key) or {}).get("Metadata") or {}).get("sha256") != sha:
                client.put_object(
                    Bucket=bucket, Key=key, Body=body, ContentType="application/json", Metadata={"sha256": sha}
                )
        result.promoted = True
        log.info("s3: %d object(s) promoted to %s; pointer %s written", len(ordered), self.url, RELEASE_POINTER)
