"""Immutable, content-addressed artifact store (Parquet + manifest), refs and lineage."""

from prefloop.storage.fingerprint import UnhashableConfigError, canonical_json, fingerprint
from prefloop.storage.gc import Removal
from prefloop.storage.layout import (
    DEFAULT_STORE,
    MAIN_TABLE,
    ArtifactExistsError,
    ArtifactNotFoundError,
    ArtifactRef,
    Manifest,
    PublishError,
    StoreError,
    TamperedArtifactError,
)
from prefloop.storage.store import ArtifactStore, open_store
from prefloop.storage.writer import ArtifactWriter

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
