"""Build and publish a matrix's collection: the support table, its schema and the collection card.

The collection goes where ``collection.publish`` says -- a local folder and an S3 prefix,
usually the folder and prefix above the pairs' own bundles -- with the same checks as a
bundle: a file already there with the same sha256 is left alone, anything else is
replaced atomically (local) or uploaded and verified (S3, :func:`flagrelease.publish.s3.publish_s3`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flagrelease._atomic import atomic_copy, atomic_write_text
from flagrelease._filehash import sha256_file
from flagrelease._redact import redact
from flagrelease.errors import PublishError
from flagrelease.matrix._card import render_collection_card
from flagrelease.matrix._config import Matrix
from flagrelease.matrix._table import _SCHEMA_PATH, SUPPORT_NAME, write_support

if TYPE_CHECKING:  # the publish package is heavy: imported when the collection is published
    from flagrelease.publish import DestinationResult, PlannedFile, PublishCredentials

__all__ = ["CARD_NAME", "SCHEMA_NAME", "Collection", "build_collection", "publish_collection"]

#: The collection card's file name.
CARD_NAME = "README.md"
#: The support table's schema, published beside it.
SCHEMA_NAME = "support.schema.json"


@dataclass
class Collection:
    """A built collection.

    Attributes:
        folder: where its files are.
        files: their names, in publishing order.
        destinations: what publishing did, one result per destination.
    """

    folder: Path
    files: list[str] = field(default_factory=lambda: [SUPPORT_NAME, SCHEMA_NAME, CARD_NAME])
    destinations: list[DestinationResult] = field(default_factory=list)

    @property
    def card(self) -> Path:
        """The collection card."""
        return self.folder / CARD_NAME

    @property
    def support(self) -> Path:
        """The support table (JSON)."""
        return self.folder / SUPPORT_NAME

    def summary(self) -> str:
        """One line per destination: what this publish did."""
        if not self.destinations:
            return "no collection destination configured (collection.publish: local_dir, s3)"
        return "; ".join(
            f"{d.name} {d.url}: {len(d.uploaded)} uploaded, {len(d.skipped)} unchanged" for d in self.destinations
        )


def build_collection(matrix: Matrix, *, table: Mapping[str, Any], folder: Path | None = None) -> Collection:
    """Write the support table, its schema and the collection card into ``folder``.

    Args:
        matrix: the matrix.
        table: its support table (:func:`flagrelease.matrix.support_table`).
        folder: where to write (default: the matrix's work folder).

    Returns:
        The collection, not yet published.
    """
    out = Collection(folder=Path(folder or matrix.work_dir))
    out.folder.mkdir(parents=True, exist_ok=True)
    write_support(table, out_dir=out.folder)
    atomic_copy(_SCHEMA_PATH, out.folder / SCHEMA_NAME)
    atomic_write_text(out.card, redact(render_collection_card(matrix, table=table)))
    return out


def _publish_local(files: list[PlannedFile], dest: Path) -> DestinationResult:
    from flagrelease.publish import DestinationResult

    result = DestinationResult(name="local", url=str(dest))
    dest.mkdir(parents=True, exist_ok=True)
    for f in files:
        target = dest / f.path
        if target.is_file() and not target.is_symlink() and sha256_file(target) == f.sha256:
            result.skipped.append(f.path)
            continue
        if target.is_dir():
            raise PublishError(f"{target} is a folder; the collection's {f.path} cannot go there")
        atomic_copy(f.local, target)
        result.uploaded.append(f.path)
        result.bytes_uploaded += f.size
    return result


def publish_collection(
    matrix: Matrix,
    collection: Collection,
    *,
    credentials: PublishCredentials | Mapping[str, Any] | None = None,
) -> Collection:
    """Publish a built collection to ``collection.publish`` (local folder, S3).

    Args:
        matrix: the matrix.
        collection: from :func:`build_collection`.
        credentials: tokens (default: the environment).

    Returns:
        ``collection`` with one :class:`~flagrelease.publish.DestinationResult` per destination.

    Raises:
        PublishError: a destination refused a file or did not verify it.
    """
    from flagrelease.publish import PlannedFile, PublishCredentials

    pub = matrix.config.collection.publish
    files = []
    for name in collection.files:
        path = collection.folder / name
        files.append(PlannedFile(name, path, path.stat().st_size, sha256_file(path), "collection"))
    collection.destinations = []
    if pub.local_dir is not None:
        if pub.local_dir.resolve() == collection.folder.resolve():
            raise PublishError(
                f"collection.publish.local_dir {pub.local_dir} is the folder the collection is built in; "
                "set collection.work_dir or collection.publish.local_dir to another folder"
            )
        collection.destinations.append(_publish_local(files, pub.local_dir))
    if pub.s3 is not None:
        from flagrelease.publish.s3 import publish_s3

        creds = PublishCredentials.from_mapping(credentials).resolved()
        collection.destinations.append(
            publish_s3(files, target=pub.s3, credentials=creds.boto3(), state_path=collection.folder / ".s3.json")
        )
    return collection
