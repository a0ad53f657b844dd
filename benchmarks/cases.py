"""Benchmark cases: seeded models and batches, each scored by a per-example loss.

Every case builds a :class:`Problem` from a fixed seed, so that every method
sees the same weights and the same batch. ``loss_fn(output, targets)`` follows
persample's convention: called on ONE example it returns that example's scalar
loss L_i; called on the whole batch it returns the mean loss (1/B) Σ_i L_i,
which is what a normal training step differentiates.

All models are in training mode with no dropout and no BatchNorm, so that
per-example gradients are well defined for every method (Opacus only records
activations of modules in training mode).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Problem", "Case", "all_cases", "select_cases"]

SEED = 0


@dataclass(frozen=True)
class Problem:
    """A built case: the model, one batch, and the per-example loss."""

    model: nn.Module
    inputs: Tensor | dict[str, Tensor]  # a dict: keyword inputs (``input_ids``, ``attention_mask``)
    targets: Tensor
    loss_fn: Callable[[object, Tensor], Tensor]
    #: w_i of the batch loss ℓ = Σ_i w_i L_i where they are not 1/B (a token mean over a padded batch): then
    #: ``plain``'s gradient is Σ_i w_i g_i, checked as such, not as the mean
    example_weights: Tensor | None = None

    @property
    def batch_size(self) -> int:
        return int(self.targets.shape[0])

    def forward(self, model: nn.Module, inputs: Tensor | dict[str, Tensor] | None = None):
        """``model`` on ``inputs`` (default: this batch's), positional or by keyword."""
        inputs = self.inputs if inputs is None else inputs
        return model(**inputs) if isinstance(inputs, dict) else model(inputs)

    def rows(self, start: int, stop: int) -> Tensor | dict[str, Tensor]:
        """Examples ``start:stop`` of the inputs."""
        if isinstance(self.inputs, dict):
            return {k: v[start:stop] for k, v in self.inputs.items()}
        return self.inputs[start:stop]

    def mean_loss(self, model: nn.Module | None = None) -> Tensor:
        """The mean loss of the batch under ``model`` (default: this problem's model)."""
        return self.loss_fn(self.forward(model or self.model), self.targets)


@dataclass(frozen=True)
class Case:
    """A model family at one batch size; ``build(device)`` returns a fresh, seeded :class:`Problem`."""

    name: str
    batch_size: int
    description: str
    builder: Callable[[int], Problem]
    quick: bool = False

    @property
    def label(self) -> str:
        return f"{self.name}-b{self.batch_size}"

    def build(self, device: str | torch.device = "cpu") -> Problem:
        torch.manual_seed(SEED)
        problem = self.builder(self.batch_size)
        return dataclasses.replace(
            problem,
            model=problem.model.to(device),
            inputs=(
                {k: v.to(device) for k, v in problem.inputs.items()}
                if isinstance(problem.inputs, dict)
                else problem.inputs.to(device)
            ),
            targets=problem.targets.to(device),
        )


# ----------------------------------------------------------------- losses
def classification_loss(output: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy, mean over the examples given."""
    return F.cross_entropy(output, targets)


def next_token_loss(output, tokens: Tensor) -> Tensor:
    """Next-token cross-entropy, mean over every predicted token.

    Every sequence has the same length, so on a batch this is the mean of the
    per-example losses.
    """
    logits = output.logits if hasattr(output, "logits") else output
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())


def masked_next_token_loss(output, labels: Tensor) -> Tensor:
    """Next-token cross-entropy of a padded batch: each example's mean over its counted tokens (labels
    ``-100`` are padding), then the mean over the examples. On a batch of one it is the example's own
    token mean, so on a batch it is the mean of the per-example losses."""
    logits = output.logits if hasattr(output, "logits") else output
    shifted = labels[:, 1:]
    per_token = F.cross_entropy(
        logits[:, :-1].flatten(0, 1), shifted.flatten(), ignore_index=-100, reduction="none"
    ).view(shifted.shape)
    counted = (shifted != -100).sum(1).clamp(min=1)
    return (per_token.sum(1) / counted).mean()


# ----------------------------------------------------------------- models
def mlp_problem(batch_size: int) -> Problem:
    """MLP 784-512-512-10 with ReLU on MNIST-shaped random inputs."""
    model = nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
    x = torch.randn(batch_size, 784)
    y = torch.randint(0, 10, (batch_size,))
    return Problem(model, x, y, classification_loss)


def cnn_problem(batch_size: int) -> Problem:
    """MNIST-style CNN: conv5x5(16)-pool-conv5x5(32)-pool-Linear(512, 128)-Linear(128, 10)."""
    model = nn.Sequential(
        nn.Conv2d(1, 16, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 7 * 7, 128),
        nn.ReLU(),
        nn.Linear(128, 10),
    )
    x = torch.randn(batch_size, 1, 28, 28)
    y = torch.randint(0, 10, (batch_size,))
    return Problem(model, x, y, classification_loss)


class LSTMClassifier(nn.Module):
    """Embedding → one-layer LSTM → Linear on the last hidden state."""

    def __init__(self, vocab: int = 1000, embed: int = 64, hidden: int = 128, classes: int = 10):
        super().__init__()
        self.embedding = nn.Embedding(vocab, embed)
        self.lstm = nn.LSTM(embed, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, tokens: Tensor) -> Tensor:
        out, _ = self.lstm(self.embedding(tokens))
        return self.head(out[:, -1])


def lstm_problem(batch_size: int, seq_len: int = 32) -> Problem:
    """LSTM classifier (vocab 1000, embedding 64, hidden 128, 10 classes) on sequences of 32 tokens."""
    model = LSTMClassifier()
    tokens = torch.randint(0, 1000, (batch_size, seq_len))
    y = torch.randint(0, 10, (batch_size,))
    return Problem(model, tokens, y, classification_loss)


class AttentionClassifier(nn.Module):
    """Embedding → ``nn.MultiheadAttention`` (self-attention, batch first) → Linear on the mean position."""

    def __init__(self, vocab: int = 1000, embed: int = 128, heads: int = 4, classes: int = 10):
        super().__init__()
        self.embedding = nn.Embedding(vocab, embed)
        self.attention = nn.MultiheadAttention(embed, heads, batch_first=True)
        self.head = nn.Linear(embed, classes)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.embedding(tokens)
        out, _ = self.attention(x, x, x, need_weights=False)
        return self.head(out.mean(1))


def mha_problem(batch_size: int, seq_len: int = 64) -> Problem:
    """Self-attention classifier (vocab 1000, width 128, 4 heads, 10 classes) on sequences of 64 tokens."""
    model = AttentionClassifier()
    tokens = torch.randint(0, 1000, (batch_size, seq_len))
    y = torch.randint(0, 10, (batch_size,))
    return Problem(model, tokens, y, classification_loss)


def gpt2_problem(
    batch_size: int, *, layers: int = 4, width: int = 256, heads: int = 4, vocab: int = 1000, seq_len: int = 128
) -> Problem:
    """Hugging Face GPT-2 LM built from a config (no download), next-token loss on random tokens."""
    import transformers

    config = transformers.GPT2Config(
        n_layer=layers,
        n_embd=width,
        n_head=heads,
        vocab_size=vocab,
        n_positions=seq_len,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        use_cache=False,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = transformers.GPT2LMHeadModel(config)
    model.train()  # dropout is 0; training mode so that Opacus records activations
    tokens = torch.randint(0, vocab, (batch_size, seq_len))
    return Problem(model, tokens, tokens, next_token_loss)


def gpt2_masked_problem(batch_size: int, seq_len: int = 128, **sizes: int) -> Problem:
    """The ``gpt2`` case on a right-padded batch: lengths drawn from [T/2, T], an ``attention_mask`` and
    labels ``-100`` on the padding (:func:`masked_next_token_loss`); ``sizes``: :func:`gpt2_problem`'s."""
    unmasked = gpt2_problem(batch_size, seq_len=seq_len, **sizes)
    lengths = torch.randint(seq_len // 2, seq_len + 1, (batch_size,))
    mask = (torch.arange(seq_len)[None, :] < lengths[:, None]).long()
    tokens = unmasked.targets
    labels = tokens.masked_fill(mask == 0, -100)
    inputs = {"input_ids": tokens, "attention_mask": mask}
    return Problem(unmasked.model, inputs, labels, masked_next_token_loss)


def gpt2_padded_problem(batch_size: int, seq_len: int = 128, **sizes: int) -> Problem:
    """The ``gpt2`` case on a right-padded batch (lengths drawn from [T/2, T], an ``attention_mask``, labels
    ``-100`` on the padding) with the usual language-model loss: the token mean over every counted token of
    the batch (:func:`next_token_loss`, which ignores -100), so example i weighs n_i / N, not 1/B."""
    masked = gpt2_masked_problem(batch_size, seq_len=seq_len, **sizes)
    counted = (masked.targets[:, 1:] != -100).sum(1).double()
    return Problem(masked.model, masked.inputs, masked.targets, next_token_loss, counted / counted.sum())


def small_gpt2_problem(batch_size: int) -> Problem:
    """The ``--quick`` GPT-2: 2 layers, width 128, T = 64."""
    return gpt2_problem(batch_size, layers=2, width=128, heads=2, seq_len=64)


def large_gpt2_problem(batch_size: int, seq_len: int = 256) -> Problem:
    """The opt-in ``gpt2-large`` case: 10 layers, width 512, 8 heads, vocab 8192, T = 256 (35.7 M
    parameters, 10.4× the ``gpt2`` case's 3.4 M; 8 layers would give 8.6×)."""
    return gpt2_problem(batch_size, layers=10, width=512, heads=8, vocab=8192, seq_len=seq_len)


#: Cases that a full run leaves out (``--large`` adds them): each plain step takes seconds on 2 CPU
#: cores, so one case alone takes longer than the rest of a full run.
LARGE_CASES = [
    Case("gpt2-large", 8, "HF GPT-2, 10 layers, width 512, vocab 8192, T=256", large_gpt2_problem),
]


#: Cases that run only when named (``--case gpt2-padded``): a variant of a full run's case, for one question.
OPT_IN_CASES = [
    Case(
        "gpt2-padded",
        16,
        "the gpt2 case right-padded (lengths T/2..T), token-mean loss over the counted tokens",
        gpt2_padded_problem,
    ),
]


def all_cases(quick: bool = False, large: bool = False, opt_in: bool = False) -> list[Case]:
    """The cases of a full run, or of a ``--quick`` run; ``large`` adds :data:`LARGE_CASES`, ``opt_in``
    :data:`OPT_IN_CASES`."""
    full = [
        Case("mlp", 32, "MLP 784-512-512-10", mlp_problem, quick=True),
        Case("mlp", 128, "MLP 784-512-512-10", mlp_problem),
        Case("cnn", 32, "CNN conv5x5(16)-conv5x5(32)-Linear-Linear", cnn_problem, quick=True),
        Case("cnn", 128, "CNN conv5x5(16)-conv5x5(32)-Linear-Linear", cnn_problem),
        Case("lstm", 32, "Embedding(1000, 64)-LSTM(128)-Linear, T=32", lstm_problem, quick=True),
        Case("mha", 32, "Embedding(1000, 128)-MultiheadAttention(4 heads)-Linear, T=64", mha_problem, quick=True),
        Case("gpt2", 16, "HF GPT-2, 4 layers, width 256, vocab 1000, T=128", gpt2_problem),
        Case("gpt2-masked", 16, "the gpt2 case right-padded (lengths T/2..T), attention_mask", gpt2_masked_problem),
    ]
    extra = (LARGE_CASES if large else []) + (OPT_IN_CASES if opt_in else [])
    if not quick:
        return full + extra
    small_gpt2 = Case(
        "gpt2-small", 8, "HF GPT-2, 2 layers, width 128, vocab 1000, T=64", small_gpt2_problem, quick=True
    )
    return [c for c in full if c.quick] + [small_gpt2] + extra


def select_cases(cases: list[Case], patterns: list[str] | None) -> list[Case]:
    """Cases whose label (``name-bB``) contains any of ``patterns`` (all when none are given)."""
    if not patterns:
        return list(cases)
    return [c for c in cases if any(p in c.label for p in patterns)]
