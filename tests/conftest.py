import os

import pytest

os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

from prefloop.storage import ArtifactStore  # noqa: E402


@pytest.fixture
def store(tmp_path) -> ArtifactStore:
    return ArtifactStore(tmp_path / "store")

