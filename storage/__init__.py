"""Immutable, content-addressed artifact store (Parquet + manifest), refs and lineage."""

from prefloop.storage.fingerprint import UnhashableConfigError, canonical_json, fingerprint
from prefloop.storage.gc import Removal
from prefloop.storage.store import (
    DEFAULT_STORE,
    MAIN_TABLE,
    ArtifactExistsError,
    ArtifactNotFoundError,
    ArtifactRef,
    ArtifactStore,
    ArtifactWriter,
    Manifest,
    PublishError,
    StoreError,
    TamperedArtifactError,
    open_store,
)

__all__ = [
    "DEFAULT_STORE",
    "MAIN_TABLE",
    "ArtifactExistsError",
    "ArtifactNotFoundError",
    "ArtifactRef",
    "ArtifactStore",
    "ArtifactWriter",
    "Manifest",
    "PublishError",
    "Removal",
    "StoreError",
    "TamperedArtifactError",
    "UnhashableConfigError",
    "canonical_json",
    "fingerprint",
    "open_store",
]
