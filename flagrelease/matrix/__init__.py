"""One model across many chips: matrix configs, the support table and the collection card.

A matrix file names one model and, per chip, the overrides of a shared release config
(:mod:`flagrelease.matrix._config`); each model x chip pair is an ordinary release,
addressed as ``<matrix file>#<chip>``.  Once the pairs have run, their bundle manifests
make the support table (:func:`support_table`, JSON with a committed schema) and the
collection card (:func:`render_collection_card`), published beside the bundles
(:func:`publish_collection`).  Plain Python: the ``flagrelease-matrix`` flow in
``flows/matrix.py`` runs the pairs and calls these.
"""

from __future__ import annotations

from flagrelease.matrix._card import benchmark_table, render_collection_card, support_matrix_table
from flagrelease.matrix._config import (
    PAIR_SEPARATOR,
    CollectionPublish,
    CollectionSection,
    Matrix,
    MatrixConfig,
    MatrixPair,
    is_matrix_file,
    load_matrix,
    load_pair,
    matrix_files,
    split_pair_reference,
    validate_matrix,
)
from flagrelease.matrix._manifests import find_manifest
from flagrelease.matrix._publish import Collection, build_collection, publish_collection
from flagrelease.matrix._table import (
    SUPPORT_NAME,
    PairOutcome,
    support_schema,
    support_table,
    table_rows,
    validate_support,
    write_support,
)

__all__ = [
    "PAIR_SEPARATOR",
    "SUPPORT_NAME",
    "Collection",
    "CollectionPublish",
    "CollectionSection",
    "Matrix",
    "MatrixConfig",
    "MatrixPair",
    "PairOutcome",
    "benchmark_table",
    "build_collection",
    "find_manifest",
    "is_matrix_file",
    "load_matrix",
    "load_pair",
    "matrix_files",
    "publish_collection",
    "render_collection_card",
    "split_pair_reference",
    "support_matrix_table",
    "support_schema",
    "support_table",
    "table_rows",
    "validate_matrix",
    "validate_support",
    "write_support",
]
