"""Cases that stay on the per-example loop say why in one line (issue 22): the SlowPathWarning and explain
name the setting that sends them there."""

import warnings

import torch
import torch.nn.functional as F

import persample
from real_models import PackedLSTM


def test_a_packed_sequence_is_named_in_the_refusal_the_warning_and_explain():
    """Was "sort along dim 0 of a tensor of shape (3,) that does not require grad (an input?)": the lengths'
    sort inside pack_padded_sequence. Now the module that takes the PackedSequence is named, with the same
    code (BATCH_MIXED), and auto's loop is exact."""
    torch.manual_seed(0)
    model = PackedLSTM().double()
    ids, lengths, y = torch.randint(0, 20, (3, 6)), torch.tensor([6, 3, 2]), torch.randint(0, 3, (3,))
    inputs = {"ids": ids, "lengths": lengths}
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        persample.grad_stats(model, F.cross_entropy, inputs, y)
    slow = [str(w.message) for w in record if issubclass(w.category, persample.SlowPathWarning)]
    assert len(slow) == 1 and "\n" not in slow[0]
    assert "module lstm (LSTM) takes a PackedSequence" in slow[0]
    fast = persample.explain(model, F.cross_entropy, inputs, y).engines["fast"]
    assert fast.refusal.code == "BATCH_MIXED" and "PackedSequence" in fast.refusal.message
