from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# One BLAS thread: the suite's small eigendecompositions run slower, not faster, when two
# threads compete for a busy 2-core machine with the test's own subprocesses.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

sys.path.insert(0, str(Path(__file__).parent))

from fake_data import make_dataset  # noqa: E402


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tests use tiny models: a second OpenMP thread only adds contention on a 2-core machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def fake_dataset(tmp_path: Path) -> Path:
    """A 40-frame 32x32 prepared dataset with audio (see tests/fake_data.py)."""
    return make_dataset(tmp_path / "data")
