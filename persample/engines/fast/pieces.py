"""Per-example gradient *pieces*: one parameter's g_i in a factored form.

The fast engine never needs all g_i at once. For each parameter it keeps a
piece from which these reductions over examples i = 1..B come out directly:

- ``sq_norms()``: ‖g_i‖², shape ``[B]``;
- ``second_moment()``: Σ_i g_i ∘ g_i, the parameter's shape;
- ``centered_second_moment(ḡ)``: M2 = Σ_i (g_i − ḡ)², the parameter's shape, without
  cancellation; ``quick_centered_second_moment(ḡ)`` may use a cheaper one-pass form and
  says when that form may have cancelled;
- ``inner(r)``: ⟨g_i, r⟩ for a fixed r of the parameter's shape, shape ``[B]``;
- ``weighted_sum(w)``: Σ_i w_i g_i (per-example clipping), the parameter's shape;
- ``projected_sum(V)``: (Σ_i g_i) as a ``[shape[0], -1]`` matrix (``as_matrix``) times V,
  without forming Σ_i g_i where a closed form allows (cheap checks against autograd's sum);
- ``materialize(start, stop)``: g_i for a slice of examples, ``[stop-start, *shape]``.

A piece holds g_i = s · h_i, where s is its ``scale`` and h_i what its
``_unscaled(start, stop)`` forms. The base class derives every reduction from
h_i in chunks (so memory stays O(chunk × P)) and applies s to the results
(B- or parameter-sized), never to the chunks; subclasses override reductions
with closed forms. Gradients are unscaled by the batch: g_i is example i's own.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...stats import sum_of_squares

__all__ = ["as_matrix", "Piece", "DensePiece", "OuterPiece", "ConvPiece", "RowsPiece", "SumPiece", "combine_pieces"]

#: Per-example gradient numbers alive at once when a piece is materialised in chunks (32 MiB in
#: float32): large enough that per-chunk costs (P-sized accumulations, kernel launches) stay small
#: next to forming the chunk, and a constant, so peak extra memory stays O(P + activations).
CHUNK_ELEMENTS = 1 << 23


#: Relative error allowed to a one-pass second moment M2 = Σg² − B·ḡ², by dtype; beyond it the
#: two-pass (centred) form is used. The one-pass error is about ε·Σg²/M2.
_CANCELLATION_BUDGET = {torch.float64: 1e-10, torch.float32: 1e-4}


def cancellation_limit(dtype: torch.dtype) -> float:
    """The largest Σg²/M2 for which the one-pass M2 is accurate to the dtype's budget."""
    return _CANCELLATION_BUDGET.get(dtype, 1e-2) / torch.finfo(dtype).eps


def _accumulate(total: Tensor | None, value: Tensor, fresh: bool = False) -> Tensor:
    """``total + value`` in place; the first value copied unless ``fresh`` (a new tensor: otherwise it
    may be a view of a reused buffer)."""
    if total is None:
        return value if fresh else value.clone()
    return total.add_(value)


#: Up to this many rows, a reduction over dim 0 beats a matrix-vector product on CPU (by about 30 % at
#: 16 rows of 65 k-2 M numbers; the product wins from 32 rows on).
_ROWS_SUMMED_DIRECTLY = 16


def _column_sums(flat: Tensor) -> Tensor:
    """Σ over dim 0 of a ``[b, n]`` chunk: a reduction over dim 0 for a few rows, one
    matrix-vector product for more (several times faster on CPU than a strided reduction
    then), or the row itself when b = 1 (a view: copy before writing)."""
    if flat.shape[0] == 1:
        return flat[0]
    if flat.shape[0] <= _ROWS_SUMMED_DIRECTLY:
        return flat.sum(0)
    return flat.new_ones(flat.shape[0]) @ flat


def may_have_cancelled(m2: Tensor, root: Tensor, weight: float) -> Tensor:
    """0-d bool: whether some element of M2 = S − ``weight``·``root``² (S: a sum of squares) may have
    lost more than the dtype's budget, i.e. S > L·M2 for L = ``cancellation_limit``, which is
    ``weight``·root² > (L − 1)·M2: one pass over M2 and the root, without S. Negative rounding
    (M2 < 0 where the true M2 ≈ 0) is flagged too, so an unflagged M2 is ≥ 0."""
    if m2.numel() == 0:
        return torch.zeros((), dtype=torch.bool, device=m2.device)
    limit = cancellation_limit(m2.dtype)
    return torch.addcmul(m2, root, root, value=-weight / (limit - 1)).min() < 0


def _sq_norms(t: Tensor) -> Tensor:
    """Σ over all but dim 0 of t², in one fused kernel."""
    return torch.linalg.vector_norm(t if t.dim() == 2 else t.reshape(t.shape[0], -1), dim=1).square_()


def as_matrix(t: Tensor) -> Tensor:
    """A parameter-shaped tensor as the ``[shape[0], -1]`` matrix ``projected_sum`` works on (0-d: 1 × 1)."""
    return t.reshape(t.shape[0], -1) if t.dim() > 0 else t.reshape(1, 1)


class Piece:
    """One parameter's per-example gradients g_i = ``scale`` · h_i for a batch of ``batch_size`` examples."""

    batch_size: int
    shape: torch.Size
    scale: float = 1.0
    #: examples formed together at most (besides the ``CHUNK_ELEMENTS`` bound)
    max_chunk_examples: int = 1 << 30
    #: ``_unscaled`` forms new numbers (no view of stored gradients): reductions may overwrite a chunk
    forms_own_chunks: bool = True

    def _unscaled(self, start: int, stop: int, out: Tensor | None = None) -> Tensor:
        """h_i = g_i / scale for examples start..stop, ``[stop - start, *shape]`` (``out``: an
        optional flat buffer to write into)."""
        raise NotImplementedError

    def materialize(self, start: int, stop: int) -> Tensor:
        """g_i for examples start..stop, ``[stop - start, *shape]``."""
        h = self._unscaled(start, stop)
        return h * self.scale if self.scale != 1.0 else h

    def materialize_all(self) -> Tensor:
        """g_i for every example, ``[B, *shape]``. One chunk: as formed; several: formed chunk by chunk
        into the result (pieces that take ``out`` write there directly), so the extra memory is at
        most one chunk besides the B × P result."""
        result: Tensor | None = None
        own = True  # result is a new tensor (not a view of stored gradients)
        for start, stop in self._chunk_ranges():
            if result is None:
                formed = self._unscaled(start, stop)
                if stop == self.batch_size:  # one chunk: the whole result
                    result, own = formed.reshape(self.batch_size, *self.shape), self.forms_own_chunks
                    break
                result = formed.new_empty(self.batch_size, *self.shape)
                result.view(self.batch_size, -1)[start:stop].copy_(formed.reshape(stop - start, -1))
                continue
            target = result.view(self.batch_size, -1)[start:stop]
            formed = self._unscaled(start, stop, out=target.view(-1))
            if formed.data_ptr() != target.data_ptr():  # a piece that does not write into ``out``
                target.copy_(formed.reshape(stop - start, -1))
        assert result is not None  # a batch has at least one example
        if self.scale == 1.0:
            return result if own else result.clone()  # never hand out stored tensors
        return result.mul_(self.scale) if own else result * self.scale

    def _chunk_ranges(self) -> list[tuple[int, int]]:
        """(start, stop) of the chunks :meth:`chunks` forms."""
        numel = max(1, self.shape.numel())
        step = max(1, min(CHUNK_ELEMENTS // numel, self.max_chunk_examples, self.batch_size))
        return [(start, min(start + step, self.batch_size)) for start in range(0, self.batch_size, step)]

    def _scaled(self, t: Tensor, power: int = 1) -> Tensor:
        """A reduction of h turned into that of g: t · scale**power."""
        return t * self.scale**power if self.scale != 1.0 else t

    def chunks(self):
        """(start, stop, h[start:stop]) over the batch, each chunk formed when it is reached and valid
        until the next one (pieces that take ``out`` reuse one buffer). Nothing is kept, so a
        reduction's extra memory is one chunk, whatever the number of parameters."""
        numel = max(1, self.shape.numel())
        step = max(1, min(CHUNK_ELEMENTS // numel, self.max_chunk_examples, self.batch_size))
        scratch = self._scratch(step * numel) if step < self.batch_size else None
        for start in range(0, self.batch_size, step):
            stop = min(start + step, self.batch_size)
            yield start, stop, self._unscaled(start, stop, out=scratch)

    def _scratch(self, numel: int) -> Tensor | None:
        """A buffer ``_unscaled`` can write chunks into, for pieces that use ``out``."""
        return None

    def _chunk_pass(
        self, mean: Tensor | None = None, *, shift: bool = False, sums: bool = False, squares: bool = True
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """One pass over the formed chunks: (c, Σ_i d_i, Σ_i d_i∘d_i) for d_i = h_i − c, flat, where c
        is ḡ/scale for ``mean``, the first chunk's mean with ``shift``, else 0 (then c is None);
        each sum only when asked for. With ``shift`` and one chunk for the whole batch, c is the
        batch mean, Σ_i d_i = 0 and is not computed (None): the pass is the exact two-pass form.

        ‖h_i‖² are kept from the same chunks (``_chunk_norms``), so the norms cost no second
        formation. Sums over examples are ``_column_sums``. d_i is written into the chunk
        itself where the piece forms its own chunks (``forms_own_chunks``), else into one buffer:
        stored gradients are never written into."""
        own = self.forms_own_chunks
        norms, center, total, squared, buffer = [], None, None, None, None
        for start, stop, h in self.chunks():
            b = stop - start
            flat = h.reshape(b, -1)
            norms.append(_sq_norms(flat))
            if center is None and mean is not None:
                center = self._center(mean, h).reshape(-1)
            elif center is None and shift:
                center = _column_sums(flat) / b  # a new tensor: chunks reuse one buffer
                sums = sums and b < self.batch_size
            if center is None:
                values = flat
            elif own:
                values = flat.sub_(center)
            else:
                values = torch.sub(flat, center, out=None if buffer is None else buffer[:b])
            if sums:  # (column sums of more than one row are a new tensor: kept as the first total)
                total = _accumulate(total, _column_sums(values), fresh=b > 1)
            if squares:
                if values is flat and not own:
                    values = torch.square(flat, out=None if buffer is None else buffer[:b])
                else:
                    values = values.square_()
                squared = _accumulate(squared, _column_sums(values), fresh=b > 1)
            if buffer is None and values is not flat:
                buffer = values  # the next chunks' d_i go here
        self.__dict__["_chunk_norms"] = torch.cat(norms)
        return center, total, squared

    def _center(self, mean: Tensor, like: Tensor) -> Tensor:
        """ḡ/scale, the centre of the unscaled h_i, shaped and typed like one h_i of ``like``."""
        center = mean.to(like.dtype).reshape(like.shape[1:])
        return center / self.scale if self.scale != 1.0 else center

    def moments(self, var: bool) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """(ḡ, M2 or None, suspect) from ONE formation of the g_i, for a parameter whose mean autograd
        did not compute (the engine skips that weight gradient: Σ_i g_i *is* it).

        Around the shift c = the first chunk's mean, each chunk adds Σ_i d_i and S = Σ_i d_i² for
        d_i = h_i − c; then h̄ = c + Σd/B and M2 = S − (Σd)²/B. S/M2 ≤ 1 + B/b for a first chunk
        of b examples (exactly two-pass, and never suspect, when the batch is one chunk), so this
        cannot cancel badly; ``suspect`` still flags S > ``cancellation_limit``·M2, where
        ``centered_second_moment`` must be used. Sums over examples are ``_column_sums`` per chunk;
        the norms ‖g_i‖² are kept from the same chunks."""
        # _chunk_pass gives the sums (sums=True) and, with var, the shift and squares; total is None for one chunk
        shift, total, squares = self._chunk_pass(shift=var, sums=True, squares=var)
        if not var:
            return self._scaled(total.div_(self.batch_size).view(self.shape)), None, None  # type: ignore[union-attr]
        if total is None:  # one chunk: the shift is the batch mean, and S is the two-pass M2
            return self._scaled(shift.view(self.shape)), self._scaled(squares.view(self.shape), 2), None  # type: ignore[union-attr]
        m2 = squares.addcmul_(total, total, value=-1.0 / self.batch_size)  # type: ignore[union-attr]
        suspect = may_have_cancelled(m2, total, 1.0 / self.batch_size)
        mean_h = total.div_(self.batch_size).add_(shift)  # type: ignore[arg-type]
        return (self._scaled(mean_h.view(self.shape)), self._scaled(m2.view(self.shape), 2), suspect)

    def sq_norms(self) -> Tensor:
        if "_chunk_norms" in self.__dict__:
            return self._scaled(self.__dict__["_chunk_norms"], 2)
        return self._scaled(torch.cat([_sq_norms(h) for _, _, h in self.chunks()]), 2)

    def second_moment(self) -> Tensor:
        """Σ_i g_i∘g_i."""
        return self._scaled(self._chunk_pass()[2].view(self.shape), 2)  # type: ignore[union-attr]  # squares=True

    def centered_second_moment(self, mean: Tensor) -> Tensor:
        """M2 = Σ_i (g_i − ḡ)² for ḡ = ``mean``, accumulated from the centred h_i − ḡ/s (two-pass:
        no cancellation, whatever |ḡ|/σ is). Forms every g_i, in chunks."""
        return self._scaled(self._chunk_pass(mean)[2].view(self.shape), 2)  # type: ignore[union-attr]  # squares=True

    def quick_centered_second_moment(self, mean: Tensor) -> tuple[Tensor, Tensor | None]:
        """(M2, suspect): M2 by the cheapest exact formula this piece has, and a 0-d bool tensor that
        is True where that formula may have cancelled (then ``centered_second_moment`` is exact),
        or None when it cannot cancel."""
        return self.centered_second_moment(mean), None

    def inner(self, ref: Tensor) -> Tensor:
        flat = ref.reshape(-1)
        products = [h.reshape(h.shape[0], -1) @ flat for _, _, h in self.chunks()]
        return self._scaled(torch.cat(products))

    def weighted_sum(self, weights: Tensor) -> Tensor:
        weights = self._scaled(weights)
        return sum(torch.tensordot(weights[a:b].to(h.dtype), h, dims=1) for a, b, h in self.chunks())

    def projected_sum(self, probe: Tensor) -> Tensor:
        """``as_matrix``(Σ_i g_i) @ probe, for a probe ``[numel / shape[0], k]``."""
        ones = torch.ones(self.batch_size, dtype=probe.dtype, device=probe.device)
        return as_matrix(self.weighted_sum(ones)) @ probe


@dataclass
class DensePiece(Piece):
    """Materialised per-example gradients ``scale · per_example``, ``[B, *shape]`` (small
    parameters, fallbacks). The scale is applied to the reductions, never to the tensor."""

    per_example: Tensor
    scale: float = 1.0
    forms_own_chunks = False  # chunks are views of ``per_example``

    def __post_init__(self):
        self.batch_size = self.per_example.shape[0]
        self.shape = self.per_example.shape[1:]

    def _unscaled(self, start, stop, out=None):
        return self.per_example[start:stop]

    def sq_norms(self):
        return self._scaled(_sq_norms(self.per_example), 2)

    def second_moment(self):
        return sum_of_squares(self.per_example) * self.scale**2

    def centered_second_moment(self, mean):
        """Two-pass M2. Small rows (biases, norms) around their own column mean, which is ḡ/s up to
        rounding (Σ(g − c)² is least at the exact mean): three small kernels (a ``var`` over dim 0 is
        a strided reduction, 10-100× slower on CPU). Larger rows in chunks around ḡ/s."""
        if self.per_example[0].numel() >= (1 << 16):
            return super().centered_second_moment(mean)
        flat = self.per_example.reshape(self.batch_size, -1)
        deviations = torch.sub(flat, _column_sums(flat) / self.batch_size)
        return self._scaled(_column_sums(deviations.square_()).view(self.shape), 2)

    def inner(self, ref):
        return (self.per_example.reshape(self.batch_size, -1) @ ref.reshape(-1).to(self.per_example.dtype)) * self.scale

    def weighted_sum(self, weights):
        return torch.tensordot(weights.to(self.per_example.dtype) * self.scale, self.per_example, dims=1)


@dataclass
class OuterPiece(Piece):
    """g_i = Σ_t grad[i, t] ⊗ act[i, t]  (a p × d matrix per example), reshaped to ``shape``.

    ``act: [B, T, d]`` are the layer's inputs, ``grad: [B, T, p]`` the gradients of
    its outputs; T indexes positions (sequence, spatial locations, repeated calls).
    ``transposed`` stores the weight as d × p (Hugging Face ``Conv1D``).

    - T = 1: ‖g_i‖² = ‖a_i‖²‖b_i‖² and Σ_i g_i∘g_i = (b∘b)ᵀ(a∘a) (Goodfellow 2015).
    - T > 1: ‖g_i‖² = ⟨A_iA_iᵀ, B_iB_iᵀ⟩ (the "ghost norm", Li et al. 2021) when that
      costs no more flops, T·(p + d) ≤ p·d (at a tie it also avoids B × p × d memory traffic),
      unless the second moment has already formed g_i in chunks; otherwise from those chunks.
    - ⟨g_i, R⟩ = Σ_t b_itᵀ R a_it, and Σ_i w_i g_i = (w∘B)ᵀA, at the cost of one matmul.
    """

    act: Tensor
    grad: Tensor
    shape: torch.Size
    transposed: bool = False
    scale: float = 1.0  # g_i uses scale · grad: folded into the arithmetic, never a pass over grad

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

    def _unscaled(self, start, stop, out: Tensor | None = None):
        grad, act = self.grad[start:stop], self.act[start:stop]
        left, right = (act, grad) if self.transposed else (grad, act)  # stored d × p: form Aᵀ B, no copy
        if out is not None:
            out = out[: (stop - start) * self.shape.numel()].view(stop - start, left.shape[2], right.shape[2])
        return torch.bmm(left.transpose(1, 2), right, out=out).view(stop - start, *self.shape)

    def _scratch(self, numel):
        return self.act.new_empty(numel)

    def materialize_all(self) -> Tensor:
        """g_i for every example, formed straight into the ``[B, *shape]`` result by one batched
        product (T = 1: a broadcast outer product), the scale folded into the smaller factor: no
        chunk, no copy and no pass over the result besides forming it."""
        grad, act = self.grad, self.act
        if self.scale != 1.0:
            if grad.numel() <= act.numel():
                grad = grad * self.scale
            else:
                act = act * self.scale
        left, right = (act, grad) if self.transposed else (grad, act)  # stored d × p: form Aᵀ B
        result = left.new_empty(self.batch_size, left.shape[2], right.shape[2])
        if self.positions == 1:
            torch.mul(left.transpose(1, 2), right, out=result)
        else:
            torch.bmm(left.transpose(1, 2), right, out=result)
        return result.view(self.batch_size, *self.shape)

    def _ghost_is_cheaper(self) -> bool:
        p, d = self.grad.shape[-1], self.act.shape[-1]
        return self.positions * (p + d) <= p * d

    @cached_property
    def _squares(self) -> tuple[Tensor, Tensor]:
        """T = 1: (a∘a, (s·b)∘(s·b)), ``[B, d]`` and ``[B, p]``: activation-sized, made for the
        second moment and reused by the norms when both are wanted."""
        b2 = self.grad[:, 0].square()
        if self.scale != 1.0:
            b2.mul_(self.scale**2)
        return self.act[:, 0].square(), b2

    def sq_norms(self):
        if self.positions == 1:
            if "_squares" in self.__dict__:  # the second moment made them: two row sums
                a2, b2 = self._squares
                return a2.sum(1) * b2.sum(1)
            norms = torch.linalg.vector_norm(self.act[:, 0], dim=1)  # (‖a_i‖‖b_i‖)²: two fused norms
            return self._scaled(norms.mul_(torch.linalg.vector_norm(self.grad[:, 0], dim=1)).square_(), 2)
        if "_chunk_norms" not in self.__dict__ and self._ghost_is_cheaper():
            gram_a = torch.bmm(self.act, self.act.transpose(1, 2))
            gram_b = torch.bmm(self.grad, self.grad.transpose(1, 2))
            return self._scaled((gram_a * gram_b).sum((1, 2)), 2)
        return super().sq_norms()  # from the chunks the second moment formed, or formed now

    def second_moment(self):
        if self.positions == 1:
            a2, b2 = self._squares
            return self._param(b2.t() @ a2)
        return super().second_moment()

    def quick_centered_second_moment(self, mean):
        """T = 1: M2 = (b∘b)ᵀ(a∘a) − B·ḡ∘ḡ, at the cost of one matmul. That difference cancels
        where |ḡ_j| ≫ σ_j (relative error ≈ ε·Σg²/M2): elements with Σg² > ``cancellation_limit``·M2
        make the piece suspect, and the two-pass ``centered_second_moment`` is used instead."""
        if self.positions != 1:
            return super().quick_centered_second_moment(mean)
        m2 = self.second_moment().addcmul_(mean, mean, value=-self.batch_size)  # a new tensor: in place
        return m2, may_have_cancelled(m2, mean, self.batch_size)

    def inner(self, ref):
        projected = self.grad @ self._matrix(ref)  # [B, T, d]
        return self._scaled((projected * self.act).sum((1, 2)))

    def weighted_sum(self, weights):
        weighted = self.grad * self._scaled(weights.to(self.grad.dtype)).view(-1, 1, 1)
        return self._param(weighted.flatten(0, 1).t() @ self.act.flatten(0, 1))

    def projected_sum(self, probe):
        """s·Bᵀ(A V) (or s·Aᵀ(B V) when stored d × p): O(B·T·(p + d)·k), no p × d product. The sum runs
        over the B·T (example, position) rows in whichever order reads each factor without a copy (a
        sequence-first gradient: positions outer); only the ``[B·T, k]`` product is reordered."""
        left, right = (self.act, self.grad) if self.transposed else (self.grad, self.act)
        left_rows, left_first = _rows_of(left)
        right_rows, right_first = _rows_of(right)
        projected = right_rows @ probe
        if right_first != left_first:  # the other order of (example, position): [T, B, k] <-> [B, T, k]
            outer = right.shape[1] if right_first else right.shape[0]
            projected = projected.view(outer, -1, probe.shape[1]).transpose(0, 1).flatten(0, 1)
        return self._scaled(left_rows.t() @ projected)


def _rows_of(t: Tensor) -> tuple[Tensor, bool]:
    """A ``[B, T, n]`` tensor as a ``[B·T, n]`` matrix, and whether its rows run positions first (t, b): a
    view where either order allows one (a sequence-first tensor transposed to batch first), else a copy."""
    if not t.is_contiguous() and t.transpose(0, 1).is_contiguous():
        return t.transpose(0, 1).flatten(0, 1), True
    return t.flatten(0, 1), False


def padded_input(conv: nn.modules.conv._ConvNd, x: Tensor) -> Tensor:
    """``x`` padded as the convolution pads it (any ``padding_mode``, int or 'same'/'valid'),
    for a convolution with no padding of its own."""
    pad = conv._reversed_padding_repeated_twice  # the module's own, last dim first, as F.pad wants
    if not any(pad):
        return x
    return F.pad(x, pad, mode="constant" if conv.padding_mode == "zeros" else conv.padding_mode)


@dataclass
class ConvPiece(Piece):
    """Convolution weights: g_i from ``convolution_backward`` with the batch folded into groups.

    For examples i of a chunk, the input ``[b, C_in, *]`` and output gradient
    ``[b, C_out, *]`` are viewed as one example with b·groups groups, whose
    weight gradient ``[b·C_out, C_in/groups, *k]`` is every example's own, at the
    cost of the usual weight-gradient convolution and without unfolding patches.
    """

    conv: nn.modules.conv._ConvNd
    x: Tensor
    grad: Tensor
    shape: torch.Size
    scale: float = 1.0
    #: oneDNN's grouped weight-gradient convolution slows down past ~16 groups (2x at 64–128 on CPU)
    max_chunk_examples: int = 16

    def __post_init__(self):
        self.batch_size = self.x.shape[0]

    def _weight_gradient(self, x: Tensor, gy: Tensor, groups: int) -> Tensor:
        """The weight-gradient convolution of input ``x`` and output gradient ``gy`` with ``groups``
        groups, padded as the layer pads. Only the weight's shape matters, never its values."""
        conv = self.conv
        if conv.padding_mode == "zeros" and not isinstance(conv.padding, str):
            padding = conv.padding  # let the convolution pad, without a padded copy of x
        else:
            x, padding = padded_input(conv, x), (0,) * (x.dim() - 2)
        channels_out = gy.shape[1]
        weight = conv.weight.new_empty(channels_out, *self.shape[1:])
        _, grad_weight, _ = torch.ops.aten.convolution_backward(
            gy,
            x,
            weight,
            None,
            conv.stride,
            padding,
            conv.dilation,
            False,
            [0] * (x.dim() - 2),
            groups,
            [False, True, False],
        )
        return grad_weight

    def _unscaled(self, start, stop, out=None):
        b = stop - start
        x = self.x[start:stop].reshape(1, -1, *self.x.shape[2:])
        gy = self.grad[start:stop].reshape(1, -1, *self.grad.shape[2:])
        return self._weight_gradient(x, gy, b * self.conv.groups).view(b, *self.shape)

    def weighted_sum(self, weights):
        """Σ_i w_i g_i: the ordinary weight-gradient convolution of the batch, with w_i·s on each
        example's output gradient (no per-example gradients formed)."""
        w = self._scaled(weights.to(self.grad.dtype)).view(-1, *([1] * (self.grad.dim() - 1)))
        return self._weight_gradient(self.x, self.grad * w, self.conv.groups)


@dataclass
class RowsPiece(Piece):
    """Embedding: g_i = Σ_t e_{ids[i,t]} ⊗ grad[i, t], rows of a ``[V, d]`` weight.

    Gradients of equal (example, row) pairs are first summed into segments S_u
    (one per distinct token of an example); then ‖g_i‖² = Σ_{u∈i} ‖S_u‖²,
    Σ_i g_i∘g_i = scatter-add of S_u² into rows, ⟨g_i, R⟩ = Σ_{u∈i} ⟨S_u, R[row_u]⟩.
    Cost O(B·T·d), independent of V. Rows equal to ``padding_idx`` get no gradient.

    Every size here is known on the host: the n = B·T positions give n segment slots, sorted by
    (example, row); the U ≤ n distinct pairs fill the first U slots and the rest hold zeros (example 0,
    row 0, ``valid`` False), which add nothing to any sum. No ``unique``, no boolean-mask indexing, so no
    host-device synchronisation.
    """

    ids: Tensor
    grad: Tensor
    shape: torch.Size
    padding_idx: int | None = None
    scale: float = 1.0

    def __post_init__(self):
        self.batch_size = self.ids.shape[0]
        rows, dim = self.shape
        tokens = self.ids.shape[1]
        example = torch.arange(self.batch_size, device=self.ids.device).repeat_interleave(tokens)
        ids, grad = self.ids.reshape(-1), self.grad.reshape(-1, dim)
        real = None
        if self.padding_idx is not None:  # padding positions (an id no row may have, e.g. -1): zero, row 0
            real = ids != self.padding_idx
            grad = grad * real.unsqueeze(1).to(grad.dtype)
            ids = torch.where(real, ids, 0)
        keys = example * rows + ids
        sorted_keys, order = torch.sort(keys)
        starts = torch.ones_like(sorted_keys, dtype=torch.bool)
        starts[1:] = sorted_keys[1:] != sorted_keys[:-1]
        slot_sorted = starts.cumsum(0) - 1  # the segment of each sorted position: 0 … U − 1
        inverse = torch.empty_like(slot_sorted).scatter_(0, order, slot_sorted)
        self.segments = grad.new_zeros(keys.shape[0], dim).index_add_(0, inverse, grad)
        slot_keys = torch.zeros_like(sorted_keys).scatter_(0, slot_sorted, sorted_keys)
        self.occupied = torch.arange(keys.shape[0], device=keys.device) <= slot_sorted[-1]
        self.example_of, self.row_of = slot_keys // rows, slot_keys % rows
        self.valid = self.occupied  # the slots of an (example, row) pair that gets a gradient
        if real is not None:  # a segment of padding positions alone gets none and uses no row
            self.valid = self.valid & (torch.zeros_like(keys).index_add_(0, inverse, real.long()) > 0)

    def _per_example(self, values: Tensor) -> Tensor:
        return values.new_zeros(self.batch_size).index_add_(0, self.example_of, values)

    def _rows(self, values: Tensor) -> Tensor:
        return values.new_zeros(self.shape).index_add_(0, self.row_of, values)

    def _unscaled(self, start, stop, out=None):
        return self.add_unscaled_into(self.segments.new_zeros(stop - start, *self.shape), start, stop)

    def add_unscaled_into(self, total: Tensor, start: int, stop: int) -> Tensor:
        """``total += h[start:stop]`` in place (one scatter of the segments), and return it. Segments of
        other examples are scattered as zeros into example ``start`` (fixed sizes: no host read)."""
        keep = (self.example_of >= start) & (self.example_of < stop)
        at = torch.where(keep, self.example_of - start, 0)
        values = self.segments * keep.unsqueeze(1).to(self.segments.dtype)
        if not total.is_contiguous():
            return total.index_put_((at, self.row_of), values, accumulate=True)
        # The same sums as index_put_(accumulate=True), ten times faster on CPU: one index_add_ of the
        # [B·V, d] rows. Each kept (example, row) pair is one slot, so each element gets one value and
        # zeros, whatever the order: the result is the same to the bit.
        rows = self.shape[0]
        total.view(-1, *self.shape[1:]).index_add_(0, at * rows + self.row_of, values)
        return total

    def sq_norms(self):
        return self._scaled(self._per_example(_sq_norms(self.segments)), 2)

    def second_moment(self):
        return self._scaled(self._rows(self.segments.square()), 2)

    def centered_second_moment(self, mean):
        """Σ_i (g_i[r] − ḡ_r)² = Σ_{u at row r} (S_u − ḡ_r)² + (B − n_r)·ḡ_r², with n_r the examples
        that use row r (the others' g_i[r] is 0): centred, so exact without cancellation."""
        center = mean.to(self.segments.dtype) / self.scale
        # (a bincount's output length is read from the device: a scatter into the known rows is not)
        ones = self.valid.to(center.dtype)  # the empty slots use no row
        used_by = center.new_zeros(self.shape[0]).index_add_(0, self.row_of, ones)
        deviation = (self.segments - center[self.row_of]) * ones.unsqueeze(1)  # empty slots: no deviation
        total = self._rows(deviation.square())
        return self._scaled(total.addcmul_((self.batch_size - used_by).unsqueeze(1), center.square()), 2)

    def inner(self, ref):
        return self._scaled(self._per_example((self.segments * ref[self.row_of]).sum(1)))

    def weighted_sum(self, weights):
        return self._rows(self.segments * self._scaled(weights.to(self.segments.dtype))[self.example_of, None])

    def projected_sum(self, probe):
        """``as_matrix``(Σ_i g_i) @ V = s · Σ_u (S_u V) at row r_u: each segment projected, then k columns
        scattered (not the [rows, d] sum of the segments, then its product)."""
        projected = self.segments.reshape(self.segments.shape[0], -1).to(probe.dtype) @ probe
        return self._scaled(projected.new_zeros(self.shape[0], probe.shape[1]).index_add_(0, self.row_of, projected))


@dataclass
class SumPiece(Piece):
    """g_i = Σ_k g_i^(k): a parameter used by several layers of different kinds (tied weights).

    Second moments need the cross terms, so g_i is formed in chunks (and the norms come
    from those chunks); norms alone of a tied embedding and output projection have a
    closed form. Inner products and weighted sums are linear and add up piece by piece.
    """

    parts: list

    def __post_init__(self):
        self.batch_size = self.parts[0].batch_size
        self.shape = self.parts[0].shape
        scales = {part.scale for part in self.parts}
        self.scale = scales.pop() if len(scales) == 1 else 1.0  # a shared scale stays out of the chunks

    def _unscaled(self, start, stop, out=None):
        if any(part.scale != self.scale for part in self.parts):  # scale 1: each part applies its own
            return sum(part.materialize(start, stop) for part in self.parts)
        rows = [part for part in self.parts if isinstance(part, RowsPiece)]
        formed = [part for part in self.parts if not isinstance(part, RowsPiece)]
        if not formed:
            total = rows[0].segments.new_zeros(stop - start, *self.shape)
        else:
            total = formed[0]._unscaled(start, stop)
            if not formed[0].forms_own_chunks:
                total = total.clone()  # a view of stored gradients: never written into
            for part in formed[1:]:
                total.add_(part._unscaled(start, stop))
        for part in rows:  # scattered into the formed sum: no B × P zeros, no B × P additions
            part.add_unscaled_into(total, start, stop)
        return total

    def sq_norms(self):
        pair = _embedding_and_projection(self.parts)
        if pair is None or "_chunk_norms" in self.__dict__:  # formed already for the second moment
            return super().sq_norms()
        rows, outer = pair
        return rows.sq_norms() + outer.sq_norms() + 2 * _rows_outer_cross(rows, outer)

    def inner(self, ref):
        return sum(part.inner(ref) for part in self.parts)

    def weighted_sum(self, weights):
        return sum(part.weighted_sum(weights) for part in self.parts)

    def projected_sum(self, probe):
        return sum(part.projected_sum(probe) for part in self.parts)


def _embedding_and_projection(parts: list) -> tuple | None:
    """The (embedding rows, output projection) pair of a tied language-model weight, if that is what ``parts`` is."""
    if len(parts) != 2:
        return None
    rows = next((p for p in parts if isinstance(p, RowsPiece)), None)
    outer = next((p for p in parts if isinstance(p, OuterPiece) and not p.transposed), None)
    return (rows, outer) if rows is not None and outer is not None else None


def _rows_outer_cross(rows: RowsPiece, outer: OuterPiece) -> Tensor:
    """⟨G_rows,i, G_outer,i⟩ without forming either: G_outer,i = s·B_iᵀA_i has row r equal to
    s·Σ_t B_i[t, r] A_i[t], so the inner product with segment S_u at row r_u is
    s·Σ_t B_i[t, r_u] ⟨A_i[t], S_u⟩. Each example's segments are laid out in a ``[B, n_max, d]`` block
    (n_max: the positions per example, a bound on its distinct tokens), then one batched
    ``[T, d] @ [d, n_max]`` product and a gather of B at the segments' rows: fixed sizes, no host read."""
    batch, slots = rows.batch_size, rows.ids.shape[1]
    examples = rows.example_of
    occupied = rows.occupied  # (a padding row's zero segments included: they sit between the others)
    counts = torch.zeros(batch, dtype=torch.long, device=examples.device).index_add_(0, examples, occupied.long())
    first = counts.cumsum(0) - counts  # segments are sorted by example: example i's start at first[i]
    position = (torch.arange(examples.shape[0], device=examples.device) - first[examples]).clamp(0, slots - 1)
    laid = rows.segments.new_zeros(batch, slots, rows.segments.shape[1])
    laid.index_put_((examples, position), rows.segments * occupied.unsqueeze(1).to(laid.dtype), accumulate=True)
    at = rows.row_of.new_zeros(batch, slots).index_put_((examples, position), rows.row_of * occupied, accumulate=True)
    act = outer.act.to(laid.dtype)
    products = torch.bmm(act, laid.transpose(1, 2))  # [B, T, n_max]: ⟨A_i[t], S_u⟩
    grads = torch.gather(outer.grad.to(laid.dtype), 2, at.unsqueeze(1).expand(-1, outer.grad.shape[1], -1))
    return (products * grads).sum((1, 2)) * (rows.scale * outer.scale)


def combine_pieces(pieces: list[Piece]) -> Piece:
    """One piece for a parameter with several contributions (reuse, tying).

    Calls of the same layout concatenate along positions, which keeps the closed
    forms exact: reusing a Linear T times is a length-T sequence. Other mixes
    become a :class:`SumPiece`.
    """
    if len(pieces) == 1:
        return pieces[0]
    first: Any = pieces[0]  # a piece of the kind that all() below checks every piece is
    if all(
        isinstance(p, OuterPiece)
        and p.transposed == first.transposed
        and p.scale == first.scale
        and p.act.shape[2] == first.act.shape[2]
        and p.grad.shape[2] == first.grad.shape[2]
        for p in pieces
    ):
        return OuterPiece(  # every piece is an OuterPiece (all() above)
            torch.cat([p.act for p in pieces], 1),  # type: ignore[attr-defined]
            torch.cat([p.grad for p in pieces], 1),  # type: ignore[attr-defined]
            first.shape,
            first.transposed,
            first.scale,
        )
    if all(isinstance(p, RowsPiece) and p.padding_idx == first.padding_idx and p.scale == first.scale for p in pieces):
        return RowsPiece(  # every piece is a RowsPiece (all() above)
            torch.cat([p.ids for p in pieces], 1),  # type: ignore[attr-defined]
            torch.cat([p.grad for p in pieces], 1),  # type: ignore[attr-defined]
            first.shape,
            first.padding_idx,
            first.scale,
        )
    if all(isinstance(p, DensePiece) for p in pieces):
        return DensePiece(cast(Tensor, sum(p.materialize(0, p.batch_size) for p in pieces)))  # pieces: 2 or more
    return SumPiece(list(pieces))
