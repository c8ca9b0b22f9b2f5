"""Objects up to S3 (or any S3 API) with boto3: idempotent, resumable, verified.

- A file whose object already carries the same ``sha256`` metadata is skipped.
- Small files go up in one ``PutObject`` with a SHA-256 checksum; files above the
  multipart threshold go up in parts (``TransferConfig.multipart_chunksize``), each with
  its own SHA-256 checksum.
- An interrupted multipart upload resumes: the upload id is kept in a small state file,
  the parts already stored are listed and checked against the local data (size and MD5
  ETag), and only the missing or different parts are sent.
- After each upload the object is checked: size, sha256 metadata, the MD5-based ETag
  (when the bucket does not use SSE-KMS) and the SHA-256 checksum when the service
  returns one.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import math
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

from flagrelease._atomic import atomic_write_json
from flagrelease.config import S3Target
from flagrelease.errors import PublishError
from flagrelease.publish._types import DestinationResult, PlannedFile, content_type

__all__ = ["PartProgress", "publish_s3", "s3_key"]

log = logging.getLogger("flagrelease.publish.s3")

_MAX_PARTS = 10_000
_MIN_PART = 5 * 1024 * 1024

#: Called after each part is stored: (path, part number, parts in all).
PartProgress = Callable[[str, int, int], None]


def s3_key(target: S3Target, path: str) -> str:
    """The object key of a bundle path below the target's prefix."""
    return f"{target.prefix}/{path}" if target.prefix else path


def _client(target: S3Target, credentials: Mapping[str, str]) -> Any:
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=target.endpoint_url,
        region_name=target.region,
        config=Config(retries={"max_attempts": 5, "mode": "standard"}),
        **dict(credentials),
    )


def _b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode("ascii")


def _head(client: Any, bucket: str, key: str) -> dict[str, Any] | None:
    from botocore.exceptions import ClientError

    try:
        head: dict[str, Any] = client.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
        return head
    except ClientError as err:
        if err.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
            return None
        raise


def _part_size(size: int, chunk: int) -> int:
    return max(chunk, _MIN_PART, math.ceil(size / _MAX_PARTS))


def _read_part(path: Path, number: int, part_size: int) -> bytes:
    with open(path, "rb") as fh:
        fh.seek((number - 1) * part_size)
        return fh.read(part_size)


class _State:
    """Multipart upload ids kept between runs, so an interrupted upload resumes."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.data: dict[str, dict[str, Any]] = {}
        if path is not None and path.is_file():
            try:
                loaded = json.loads(path.read_text(encoding="utf-8"))
                self.data = loaded if isinstance(loaded, dict) else {}
            except (OSError, ValueError):
                self.data = {}

    def get(self, key: str) -> dict[str, Any] | None:
        return self.data.get(key)

    def put(self, key: str, value: dict[str, Any] | None) -> None:
        if value is None:
            self.data.pop(key, None)
        else:
            self.data[key] = value
        if self.path is not None:
            atomic_write_json(self.path, self.data)


def _verify(client: Any, bucket: str, key: str, f: PlannedFile, *, etag: str, checksums: set[str]) -> None:
    head = _head(client, bucket, key)
    problems = []
    if head is None:
        problems.append("the object is not there after the upload")
    else:
        if int(head.get("ContentLength", -1)) != f.size:
            problems.append(f"size {head.get('ContentLength')} != {f.size}")
        if (head.get("Metadata") or {}).get("sha256") != f.sha256:
            problems.append("sha256 metadata differs")
        if head.get("ServerSideEncryption") != "aws:kms" and head.get("ETag", "").strip('"') != etag:
            problems.append(f"ETag {head.get('ETag')} != {etag}")
        remote = head.get("ChecksumSHA256")
        if remote and remote not in checksums:
            problems.append(f"SHA-256 checksum {remote} differs")
    if problems:
        raise PublishError(
            f"s3://{bucket}/{key}: the stored object does not match {f.local} ({'; '.join(problems)}); "
            "publish again to re-upload it"
        )


def _put(client: Any, bucket: str, key: str, f: PlannedFile) -> None:
    data = f.local.read_bytes()
    if hashlib.sha256(data).hexdigest() != f.sha256:
        raise PublishError(f"{f.local} changed while publishing; re-run the card stage, then publish again")
    client.put_object(
        Bucket=bucket,
        Key=key,
        Body=data,
        ContentType=content_type(f.path),
        Metadata={"sha256": f.sha256},
        ChecksumSHA256=_b64(bytes.fromhex(f.sha256)),
    )
    _verify(
        client,
        bucket,
        key,
        f,
        etag=hashlib.md5(data, usedforsecurity=False).hexdigest(),
        checksums={_b64(bytes.fromhex(f.sha256))},
    )


def _existing_parts(client: Any, bucket: str, key: str, upload_id: str) -> dict[int, dict[str, Any]]:
    parts: dict[int, dict[str, Any]] = {}
    marker = 0
    while True:
        resp = client.list_parts(Bucket=bucket, Key=key, UploadId=upload_id, PartNumberMarker=marker)
        for p in resp.get("Parts", []):
            parts[int(p["PartNumber"])] = p
        if not resp.get("IsTruncated"):
            return parts
        marker = int(resp["NextPartNumberMarker"])


def _open_uploads(client: Any, bucket: str, key: str) -> list[str]:
    resp = client.list_multipart_uploads(Bucket=bucket, Prefix=key)
    return [u["UploadId"] for u in resp.get("Uploads", []) if u["Key"] == key]


def _multipart(
    client: Any,
    bucket: str,
    key: str,
    f: PlannedFile,
    *,
    chunk: int,
    concurrency: int,
    state: _State,
    on_part: PartProgress | None,
) -> dict[str, int]:
    """Upload ``f`` in parts, resuming a recorded upload; return counts of sent and reused parts."""
    part_size = _part_size(f.size, chunk)
    n_parts = max(1, math.ceil(f.size / part_size))
    state_key = f"{bucket}/{key}"
    record = state.get(state_key)
    open_ids = _open_uploads(client, bucket, key)
    upload_id: str | None = None
    if (
        record
        and record.get("sha256") == f.sha256
        and record.get("part_size") == part_size
        and record.get("upload_id") in open_ids
    ):
        upload_id = str(record["upload_id"])
    for stale in open_ids:
        if stale != upload_id:
            log.info("s3://%s/%s: aborting an unfinished upload of other content", bucket, key)
            client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=stale)
    if upload_id is None:
        upload_id = client.create_multipart_upload(
            Bucket=bucket,
            Key=key,
            ContentType=content_type(f.path),
            Metadata={"sha256": f.sha256},
            ChecksumAlgorithm="SHA256",
        )["UploadId"]
        state.put(state_key, {"upload_id": upload_id, "sha256": f.sha256, "part_size": part_size})
        existing: dict[int, dict[str, Any]] = {}
    else:
        existing = _existing_parts(client, bucket, key, upload_id)

    md5s: dict[int, bytes] = {}
    shas: dict[int, bytes] = {}
    done: dict[int, dict[str, Any]] = {}
    reused = 0
    todo: list[int] = []
    whole = hashlib.sha256()
    # One pass over the file: hashes for the final checks, and which stored parts still match.
    for number in range(1, n_parts + 1):
        data = _read_part(f.local, number, part_size)
        whole.update(data)
        md5s[number] = hashlib.md5(data, usedforsecurity=False).digest()
        shas[number] = hashlib.sha256(data).digest()
        stored = existing.get(number)
        if stored and int(stored["Size"]) == len(data) and stored["ETag"].strip('"') == md5s[number].hex():
            done[number] = {"PartNumber": number, "ETag": stored["ETag"], "ChecksumSHA256": _b64(shas[number])}
            reused += 1
        else:
            todo.append(number)
    if whole.hexdigest() != f.sha256:
        raise PublishError(f"{f.local} changed while publishing; re-run the card stage, then publish again")
    if reused:
        log.info("s3://%s/%s: resuming, %d of %d part(s) already stored", bucket, key, reused, n_parts)

    def send(number: int) -> dict[str, Any]:
        data = _read_part(f.local, number, part_size)
        resp = client.upload_part(
            Bucket=bucket,
            Key=key,
            UploadId=upload_id,
            PartNumber=number,
            Body=data,
            ChecksumAlgorithm="SHA256",
            ChecksumSHA256=_b64(shas[number]),
        )
        if resp["ETag"].strip('"') != md5s[number].hex():
            raise PublishError(f"s3://{bucket}/{key}: part {number} was stored with a different ETag; publish again")
        return {"PartNumber": number, "ETag": resp["ETag"], "ChecksumSHA256": _b64(shas[number])}

    with ThreadPoolExecutor(max_workers=max(1, concurrency), thread_name_prefix="s3-part") as pool:
        pending: dict[Future[dict[str, Any]], int] = {}
        queue = list(todo)
        try:
            while queue or pending:
                while queue and len(pending) < max(1, concurrency):
                    number = queue.pop(0)
                    pending[pool.submit(send, number)] = number
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in finished:
                    number = pending.pop(fut)
                    done[number] = fut.result()
                    if on_part is not None:
                        on_part(f.path, number, n_parts)
        except BaseException:
            for fut in pending:
                fut.cancel()
            raise

    parts = [done[n] for n in sorted(done)]
    client.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts})
    state.put(state_key, None)
    composite = _b64(hashlib.sha256(b"".join(shas[n] for n in sorted(shas))).digest())
    etag = hashlib.md5(b"".join(md5s[n] for n in sorted(md5s)), usedforsecurity=False).hexdigest() + f"-{n_parts}"
    _verify(client, bucket, key, f, etag=etag, checksums={composite, f"{composite}-{n_parts}"})
    return {"parts_sent": len(todo), "parts_reused": reused, "parts": n_parts}


def _matches(head: dict[str, Any] | None, f: PlannedFile) -> bool:
    return (
        head is not None
        and (head.get("Metadata") or {}).get("sha256") == f.sha256
        and int(head.get("ContentLength", -1)) == f.size
    )


def _upload(
    client: Any,
    target: S3Target,
    files: list[PlannedFile],
    *,
    config: Any,
    state: _State,
    on_part: PartProgress | None,
    result: DestinationResult,
) -> None:
    """Upload below ``target`` each file whose object there differs; record what was done in ``result``."""
    for f in files:
        key = s3_key(target, f.path)
        if _matches(_head(client, target.bucket, key), f):
            result.skipped.append(f.path)
            continue
        if f.size >= config.multipart_threshold:
            counts = _multipart(
                client,
                target.bucket,
                key,
                f,
                chunk=int(config.multipart_chunksize),
                concurrency=int(config.max_concurrency),
                state=state,
                on_part=on_part,
            )
            result.details["parts_sent"] += counts["parts_sent"]
            result.details["parts_reused"] += counts["parts_reused"]
        else:
            _put(client, target.bucket, key, f)
        result.uploaded.append(f.path)
        result.bytes_uploaded += f.size
        log.info("s3: %s -> s3://%s/%s", f.path, target.bucket, key)


@contextlib.contextmanager
def _s3_errors(url: str, target: S3Target) -> Iterator[None]:
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    try:
        yield
    except ClientError as err:
        code = err.response.get("Error", {}).get("Code")
        raise PublishError(
            f"S3 refused a request to {url} ({code}): {err}; check the bucket exists and that the "
            "credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or the Prefect Secret blocks) may write to it"
        ) from err
    except NoCredentialsError as err:
        raise PublishError(
            f"no AWS credentials to write to {url}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
            "(or pass them from Prefect Secret blocks)"
        ) from err
    except BotoCoreError as err:
        raise PublishError(
            f"cannot reach S3 at {target.endpoint_url or 'AWS'}: {err}; publish again to resume"
        ) from err


def _transfer(transfer: Any | None) -> Any:
    from boto3.s3.transfer import TransferConfig

    return transfer or TransferConfig(multipart_threshold=64 << 20, multipart_chunksize=64 << 20, max_concurrency=4)


def publish_s3(
    files: list[PlannedFile],
    *,
    target: S3Target,
    credentials: Mapping[str, str],
    transfer: Any | None = None,
    state_path: Path | None = None,
    on_part: PartProgress | None = None,
) -> DestinationResult:
    """Upload ``files`` straight below ``s3://bucket/prefix``, skipping those already there.

    A release bundle goes through :class:`S3Destination` (staged, verified, promoted);
    this is for collections that are replaced object by object.

    Args:
        files: what to publish.
        target: bucket, prefix, endpoint and region.
        credentials: boto3 client keyword arguments (empty: boto3's own chain).
        transfer: a ``boto3.s3.transfer.TransferConfig`` (threshold, part size, concurrency).
        state_path: where to keep multipart upload ids so that an interrupted upload resumes.
        on_part: called after each part of a multipart upload is stored.

    Returns:
        What was uploaded and skipped; ``details`` counts parts sent and reused.

    Raises:
        PublishError: the bucket is unreachable or an object does not verify.
    """
    url = f"s3://{target.bucket}/{target.prefix}".rstrip("/")
    result = DestinationResult(name="s3", url=url, details={"parts_sent": 0, "parts_reused": 0})
    with _s3_errors(url, target):
        client = _client(target, credentials)
        _upload(
            client, target, files, config=_transfer(transfer), state=_State(state_path), on_part=on_part, result=result
        )
    return result
