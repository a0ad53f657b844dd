"""Per-example gradient *pieces*: one parameter's g_i in a factored form.

The fast engine never needs all g_i at once. For each parameter it keeps a
piece from which these reductions over examples i = 1..B come out directly:

- ``sq_norms()``: ‖g_i‖², shape ``[B]``;
- ``second_moment()``: Σ_i g_i ∘ g_i, the parameter's shape;
- ``inner(r)``: ⟨g_i, r⟩ for a fixed r of the parameter's shape, shape ``[B]``;
- ``weighted_sum(w)``: Σ_i w_i g_i (per-example clipping), the parameter's shape;
- ``materialize(start, stop)``: g_i for a slice of examples, ``[stop-start, *shape]``.

The base class derives every reduction from ``materialize`` in chunks (so memory
stays O(chunk × P)); subclasses override them with closed forms. Gradients are
unscaled: g_i is example i's own gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Piece", "DensePiece", "OuterPiece", "RowsPiece", "SumPiece", "combine_pieces"]

#: Per-example gradient numbers alive at once when a piece is materialised in chunks.
CHUNK_ELEMENTS = 1 << 24


class Piece:
    """One parameter's per-example gradients for a batch of ``batch_size`` examples."""

    batch_size: int
    shape: torch.Size

    def materialize(self, start: int, stop: int) -> Tensor:
        raise NotImplementedError

    def chunks(self):
        numel = max(1, self.shape.numel())
        step = max(1, CHUNK_ELEMENTS // numel)
        for start in range(0, self.batch_size, step):
            stop = min(start + step, self.batch_size)
            yield start, stop, self.materialize(start, stop)

    def sq_norms(self) -> Tensor:
        return torch.cat([g.reshape(g.shape[0], -1).pow(2).sum(1) for _, _, g in self.chunks()])

    def second_moment(self) -> Tensor:
        return sum(g.pow(2).sum(0) for _, _, g in self.chunks())

    def inner(self, ref: Tensor) -> Tensor:
        flat = ref.reshape(-1)
        return torch.cat([g.reshape(g.shape[0], -1) @ flat for _, _, g in self.chunks()])

    def weighted_sum(self, weights: Tensor) -> Tensor:
        return sum(torch.tensordot(weights[a:b].to(g.dtype), g, dims=1) for a, b, g in self.chunks())


@dataclass
class DensePiece(Piece):
    """Materialised per-example gradients ``[B, *shape]`` (small parameters, fallbacks)."""

    per_example: Tensor

    def __post_init__(self):
        self.batch_size = self.per_example.shape[0]
        self.shape = self.per_example.shape[1:]

    def materialize(self, start, stop):
        return self.per_example[start:stop]

    def chunks(self):
        yield 0, self.batch_size, self.per_example


@dataclass
class OuterPiece(Piece):
    """g_i = Σ_t grad[i, t] ⊗ act[i, t]  (a p × d matrix per example), reshaped to ``shape``.

    ``act: [B, T, d]`` are the layer's inputs, ``grad: [B, T, p]`` the gradients of
    its outputs; T indexes positions (sequence, spatial locations, repeated calls).
    ``transposed`` stores the weight as d × p (Hugging Face ``Conv1D``).

    - T = 1: ‖g_i‖² = ‖a_i‖²‖b_i‖² and Σ_i g_i∘g_i = (b∘b)ᵀ(a∘a) (Goodfellow 2015).
    - T > 1: ‖g_i‖² = ⟨A_iA_iᵀ, B_iB_iᵀ⟩ (the "ghost norm", Li et al. 2021) when that
      costs fewer flops, T·(p + d) < p·d; otherwise g_i is formed in chunks.
    - ⟨g_i, R⟩ = Σ_t b_itᵀ R a_it, and Σ_i w_i g_i = (w∘B)ᵀA, at the cost of one matmul.
    """

    act: Tensor
    grad: Tensor
    shape: torch.Size
    transposed: bool = False

    def __post_init__(self):
        self.batch_size = self.act.shape[0]

    @property
    def positions(self) -> int:
        return self.act.shape[1]

    def _matrix(self, t: Tensor) -> Tensor:
        """A parameter-shaped tensor as the p × d matrix of this layer."""
        p, d = self.grad.shape[-1], self.act.shape[-1]
        return t.reshape(d, p).t() if self.transposed else t.reshape(p, d)

    def _param(self, m: Tensor) -> Tensor:
        """A p × d matrix (or a batch of them) back to the parameter's shape."""
        if self.transposed:
            m = m.transpose(-1, -2)
        return m.reshape(*m.shape[:-2], *self.shape)

    def materialize(self, start, stop):
        return self._param(torch.bmm(self.grad[start:stop].transpose(1, 2), self.act[start:stop]))

    def _ghost_is_cheaper(self) -> bool:
        p, d = self.grad.shape[-1], self.act.shape[-1]
        return self.positions * (p + d) < p * d

    def sq_norms(self):
        if self.positions == 1:
            return self.act.pow(2).sum((1, 2)) * self.grad.pow(2).sum((1, 2))
        if self._ghost_is_cheaper():
            gram_a = torch.bmm(self.act, self.act.transpose(1, 2))
            gram_b = torch.bmm(self.grad, self.grad.transpose(1, 2))
            return (gram_a * gram_b).sum((1, 2))
        return super().sq_norms()

    def second_moment(self):
        if self.positions == 1:
            b2, a2 = self.grad[:, 0].pow(2), self.act[:, 0].pow(2)
            return self._param(b2.t() @ a2)
        return super().second_moment()

    def inner(self, ref):
        projected = self.grad @ self._matrix(ref)  # [B, T, d]
        return (projected * self.act).sum((1, 2))

    def weighted_sum(self, weights):
        weighted = self.grad * weights.to(self.grad.dtype).view(-1, 1, 1)
        return self._param(weighted.flatten(0, 1).t() @ self.act.flatten(0, 1))


@dataclass
class RowsPiece(Piece):
    """Embedding: g_i = Σ_t e_{ids[i,t]} ⊗ grad[i, t], rows of a ``[V, d]`` weight.

    Gradients of equal (example, row) pairs are first summed into segments S_u
    (one per distinct token of an example); then ‖g_i‖² = Σ_{u∈i} ‖S_u‖²,
    Σ_i g_i∘g_i = scatter-add of S_u² into rows, ⟨g_i, R⟩ = Σ_{u∈i} ⟨S_u, R[row_u]⟩.
    Cost O(B·T·d), independent of V. Rows equal to ``padding_idx`` get no gradient.
    """

    ids: Tensor
    grad: Tensor
    shape: torch.Size
    padding_idx: int | None = None

    def __post_init__(self):
        self.batch_size = self.ids.shape[0]
        rows, dim = self.shape
        tokens = self.ids.shape[1]
        example = torch.arange(self.batch_size, device=self.ids.device).repeat_interleave(tokens)
        ids, grad = self.ids.reshape(-1), self.grad.reshape(-1, dim)
        if self.padding_idx is not None:
            keep = ids != self.padding_idx
            example, ids, grad = example[keep], ids[keep], grad[keep]
        keys, inverse = torch.unique(example * rows + ids, return_inverse=True)
        self.segments = grad.new_zeros(keys.shape[0], dim).index_add_(0, inverse, grad)
        self.example_of, self.row_of = keys // rows, keys % rows

    def _per_example(self, values: Tensor) -> Tensor:
        return values.new_zeros(self.batch_size).index_add_(0, self.example_of, values)

    def _rows(self, values: Tensor) -> Tensor:
        return values.new_zeros(self.shape).index_add_(0, self.row_of, values)

    def materialize(self, start, stop):
        out = self.segments.new_zeros(stop - start, *self.shape)
        keep = (self.example_of >= start) & (self.example_of < stop)
        out[self.example_of[keep] - start, self.row_of[keep]] = self.segments[keep]
        return out

    def sq_norms(self):
        return self._per_example(self.segments.pow(2).sum(1))

    def second_moment(self):
        return self._rows(self.segments.pow(2))

    def inner(self, ref):
        return self._per_example((self.segments * ref[self.row_of]).sum(1))

    def weighted_sum(self, weights):
        return self._rows(self.segments * weights.to(self.segments.dtype)[self.example_of, None])


@dataclass
class SumPiece(Piece):
    """g_i = Σ_k g_i^(k): a parameter used by several layers of different kinds (tied weights).

    Norms and second moments need the cross terms, so g_i is formed in chunks.
    Inner products and weighted sums are linear and add up piece by piece.
    """

    parts: list

    def __post_init__(self):
        self.batch_size = self.parts[0].batch_size
        self.shape = self.parts[0].shape

    def materialize(self, start, stop):
        return sum(part.materialize(start, stop) for part in self.parts)

    def inner(self, ref):
        return sum(part.inner(ref) for part in self.parts)

    def weighted_sum(self, weights):
        return sum(part.weighted_sum(weights) for part in self.parts)


def combine_pieces(pieces: list[Piece]) -> Piece:
    """One piece for a parameter with several contributions (reuse, tying).

    Calls of the same layout concatenate along positions, which keeps the closed
    forms exact: reusing a Linear T times is a length-T sequence. Other mixes
    become a :class:`SumPiece`.
    """
    if len(pieces) == 1:
        return pieces[0]
    first = pieces[0]
    if all(isinstance(p, OuterPiece) and p.transposed == first.transposed
           and p.act.shape[2] == first.act.shape[2] and p.grad.shape[2] == first.grad.shape[2] for p in pieces):
        return OuterPiece(torch.cat([p.act for p in pieces], 1), torch.cat([p.grad for p in pieces], 1),
                          first.shape, first.transposed)
    if all(isinstance(p, RowsPiece) and p.padding_idx == first.padding_idx for p in pieces):
        return RowsPiece(torch.cat([p.ids for p in pieces], 1), torch.cat([p.grad for p in pieces], 1),
                         first.shape, first.padding_idx)
    if all(isinstance(p, DensePiece) for p in pieces):
        return DensePiece(sum(p.per_example for p in pieces))
    return SumPiece(list(pieces))
