"""Helpers shared by tests (imported as a plain module: pytest puts tests/ on sys.path)."""

from prefloop.storage import ArtifactStore


def artifact_checksums(store: ArtifactStore, ref) -> list[str]:
    """sha256 of every file of an artifact (tables, weights, tokenizer): equal content, not just equal ids."""
    manifest = store.read_manifest(ref)
    return sorted(f.sha256 for t in manifest.tables.values() for f in t.files) + sorted(f.sha256 for f in manifest.files)
