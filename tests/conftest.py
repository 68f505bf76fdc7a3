import os

import pytest

os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

from prefloop.environment import apply_offline_defaults  # noqa: E402

apply_offline_defaults()

from prefloop.storage import ArtifactStore  # noqa: E402


@pytest.fixture
def store(tmp_path) -> ArtifactStore:
    return ArtifactStore(tmp_path / "store")



@pytest.fixture(scope="module", autouse=True)
def _restore_torch_threads():
    """Some modules pin torch's thread count for speed; restore it after each module. Float reductions
    depend on the thread count, so a leaked setting would make this process's samples differ from a
    subprocess's (the resume and concurrency tests compare the two byte for byte)."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
