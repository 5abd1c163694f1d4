"""``interrupt_flag``: SIGINT/SIGTERM become a flag while training; ignored signals stay ignored."""

import os
import signal

from kvfree.train.trainer import interrupt_flag


def test_a_signal_sets_the_flag_and_handlers_are_restored():
    before = signal.getsignal(signal.SIGTERM)
    with interrupt_flag() as flag:
        os.kill(os.getpid(), signal.SIGTERM)
        assert flag["signal"] == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) == before


def test_an_ignored_signal_stays_ignored():
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with interrupt_flag() as flag:
            assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGINT)  # ignored: no flag
            assert flag["signal"] is None
            os.kill(os.getpid(), signal.SIGTERM)
            assert flag["signal"] == "SIGTERM"
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, old)
