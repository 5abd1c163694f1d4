import os
import signal

import pytest
import torch

torch.set_num_threads(int(os.environ.get("KVFREE_TEST_THREADS", "1")))

# A suite started in the background (nohup, `cmd &` in a script) inherits SIGINT ignored, and
# so would every process a test starts: the Ctrl-C tests would then fail for the shell's sake.
# Give the tests (and their subprocesses) the interactive default back.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


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
