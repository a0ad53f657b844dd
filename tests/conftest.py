"""Suite-wide checks and reporting.

Every refusal persample raises carries a code (persample/contract.py). The static check in
test_contract.py reads the source; this one watches every refusal actually built while the suite runs,
so a refusal assembled at run time without a code fails the test that met it. The summary says how
many CUDA tests skipped for want of a device.
"""

import pytest
import torch

from persample.errors import MeanMismatchError, PersampleError

_codeless: list[str] = []
_init = PersampleError.__init__


def _recording_init(self, message="", *, code=None, module=None, fix=None):
    _init(self, message, code=code, module=module, fix=fix)
    if self.code is None and not isinstance(self, MeanMismatchError):
        _codeless.append(f"{type(self).__name__}: {str(message)[:200]}")


PersampleError.__init__ = _recording_init


@pytest.fixture(autouse=True)
def _every_refusal_has_a_code():
    _codeless.clear()
    yield
    assert not _codeless, f"refusals raised without a code: {_codeless}"


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    skipped = terminalreporter.stats.get("skipped", [])
    cuda = [r for r in skipped if "test_cuda.py" in r.nodeid or "needs a CUDA device" in str(r.longrepr)]
    if cuda and not torch.cuda.is_available():
        terminalreporter.write_line(
            f"persample: no CUDA device here: {len(cuda)} CUDA test(s) skipped; they are not run by CI "
            "(run `python -m pytest -m cuda tests/test_cuda.py` on a machine with a GPU)"
        )


@pytest.fixture
def check_evaluations(monkeypatch):
    """How often the batch-loss check at the output (not the engine) evaluates the per-example losses
    itself: a list that grows by one per call of ``persample.engines.fast.per_example_losses``."""
    import persample.engines.fast as fast_package

    calls = []
    original = fast_package.per_example_losses

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(fast_package, "per_example_losses", counted)
    return calls
