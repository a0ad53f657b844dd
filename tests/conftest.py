"""Suite-wide reporting: say in the summary which tests skip for want of a device or an extra."""

from __future__ import annotations

import torch


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    skipped = terminalreporter.stats.get("skipped", [])
    cuda = [r for r in skipped if "test_cuda.py" in r.nodeid or "needs a CUDA device" in str(r.longrepr)]
    if cuda and not torch.cuda.is_available():
        terminalreporter.write_line(
            f"persample: no CUDA device here: {len(cuda)} CUDA test(s) skipped; they are not run by CI "
            "(run `python -m pytest -m cuda tests/test_cuda.py` on a machine with a GPU)")
