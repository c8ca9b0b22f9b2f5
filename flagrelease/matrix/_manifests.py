"""Finding a pair's bundle manifest: on this machine, or where the pair published it.

The matrix flow runs on a machine of its own, while each pair runs on a machine of its
chip; so a pair's ``flagrelease.json`` is looked for, in order, in its local publish
folder, its work folder (a pair that ran here), its S3 prefix and its Hugging Face Hub
repo.  A remote copy is downloaded into the matrix's work folder and read from there.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flagrelease._atomic import atomic_write_bytes
from flagrelease._redact import redact
from flagrelease.bundle import MANIFEST_NAME
from flagrelease.constants import hf_endpoint
from flagrelease.layout import BundleLayout
from flagrelease.matrix._config import MatrixPair

if TYPE_CHECKING:  # the publish package is heavy: imported only when a remote manifest is read
    from flagrelease.publish import PublishCredentials

__all__ = ["find_manifest"]

log = logging.getLogger("flagrelease.matrix")


def _from_s3(pair: MatrixPair, dest: Path, creds: PublishCredentials) -> Path | None:
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError

    from flagrelease.publish.s3 import s3_key

    target = pair.config.publish.s3
    assert target is not None
    key = s3_key(target, MANIFEST_NAME)
    try:
        client = boto3.client("s3", endpoint_url=target.endpoint_url, region_name=target.region, **creds.boto3())
        body = client.get_object(Bucket=target.bucket, Key=key)["Body"].read()
    except (BotoCoreError, ClientError) as err:
        log.warning("%s: no manifest at s3://%s/%s (%s)", pair.name, target.bucket, key, redact(str(err)))
        return None
    return atomic_write_bytes(dest, body)


def _from_hub(pair: MatrixPair, dest: Path, creds: PublishCredentials) -> Path | None:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    repo = pair.config.publish.hf_repo
    assert repo is not None
    try:
        got = hf_hub_download(
            repo, MANIFEST_NAME, token=creds.hf_token, endpoint=hf_endpoint(), local_dir=dest.parent / "hub" / pair.chip
        )
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as err:
        log.warning("%s: no manifest in %s on the hub (%s)", pair.name, repo, redact(str(err)))
        return None
    return atomic_write_bytes(dest, Path(got).read_bytes())


def find_manifest(
    pair: MatrixPair,
    *,
    download_dir: Path | None = None,
    credentials: PublishCredentials | Mapping[str, Any] | None = None,
) -> Path | None:
    """The pair's bundle manifest, wherever it is found first; None when nowhere.

    Args:
        pair: the matrix pair.
        download_dir: where a remote copy is downloaded (``<chip>.json``); without it,
            only this machine's folders are searched.
        credentials: tokens for S3 and the Hub (default: the environment).
    """
    local = pair.config.publish.local_dir
    for path in ([local / MANIFEST_NAME] if local else []) + [BundleLayout.for_release(pair.config).manifest_path]:
        if path.is_file():
            return path
    if download_dir is None:
        return None
    from flagrelease.publish import PublishCredentials

    creds = PublishCredentials.from_mapping(credentials).resolved()
    dest = Path(download_dir) / f"{pair.chip}.json"
    pub = pair.config.publish
    found = _from_s3(pair, dest, creds) if pub.s3 else None
    if found is None and pub.hf_repo:
        found = _from_hub(pair, dest, creds)
    return found
