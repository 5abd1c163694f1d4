import os

import pytest
import torch

torch.set_num_threads(int(os.environ.get("KVFREE_TEST_THREADS", "1")))


def pytest_generate_tests(metafunc):
    """Parametrize ``cfg`` from a test class's ``configs`` list (see tests/contract.py)."""
    if "cfg" in metafunc.fixturenames and metafunc.cls is not None:
        configs = getattr(metafunc.cls, "configs", None)
        if configs is not None:
            ids = [",".join(f"{k}={v}" for k, v in c.items()) or "default" for c in configs]
            metafunc.parametrize("cfg", configs, ids=ids)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
