"""A parameter's per-example gradients, formed or only through their norms and weighted sum."""

from __future__ import annotations

import torch

# Per-example gradients of one tensor are formed when they take at most this many
# elements (64 MiB in float32); larger ones use ghost norms.
MATERIALIZE_LIMIT = 1 << 24


class PerExample:
    """One parameter's per-example gradients, given implicitly."""

    def norm_sq(self) -> torch.Tensor:  # (B,)
        raise NotImplementedError

    def weighted_sum(self, c: torch.Tensor) -> torch.Tensor:  # sum_i c_i G_i
        raise NotImplementedError

    def materialized(self) -> torch.Tensor | None:  # (B, *param.shape), when formed
        return None

    def by_group(self, groups: torch.Tensor, weights: torch.Tensor, count: int) -> Materialized:
        """Per-group gradients sum_{i in u} w_i G_i (user-level DP: one row per user)."""
        grads = self.materialized()
        if grads is None:
            raise ValueError(
                "Fast DP: user-level clipping needs each layer's per-example gradients in "
                f"memory (at most {MATERIALIZE_LIMIT} values per batch); this layer's are "
                "larger: lower the batch size or train with privacy-unit example."
            )
        w = weights.to(grads.dtype).reshape(-1, *([1] * (grads.dim() - 1)))
        out = grads.new_zeros((count, *grads.shape[1:]))
        return Materialized(out.index_add_(0, groups, grads * w))


class Materialized(PerExample):
    def __init__(self, grads: torch.Tensor) -> None:
        self.grads = grads  # (B, *param.shape)

    def norm_sq(self) -> torch.Tensor:
        return self.grads.reshape(len(self.grads), -1).pow(2).sum(1)

    def weighted_sum(self, c: torch.Tensor) -> torch.Tensor:
        return torch.tensordot(c, self.grads, dims=1)

    def materialized(self) -> torch.Tensor | None:
        return self.grads


class Outer(PerExample):
    """G_i = sum_t g_it a_it^T for g (B, T, out) and a (B, T, in)."""

    def __init__(self, g: torch.Tensor, a: torch.Tensor, limit: int) -> None:
        self.g, self.a = g, a
        batch, _, d_out = g.shape
        self.grads = (
            torch.bmm(g.transpose(1, 2), a) if batch * d_out * a.shape[-1] <= limit else None
        )

    def norm_sq(self) -> torch.Tensor:
        if self.grads is not None:
            return self.grads.pow(2).sum((1, 2))
        # ||sum_t g_t a_t^T||_F^2 = sum_{t,s} (g_t . g_s)(a_t . a_s)
        gram_a = torch.bmm(self.a, self.a.transpose(1, 2))
        gram_g = torch.bmm(self.g, self.g.transpose(1, 2))
        return (gram_a * gram_g).sum((1, 2))

    def weighted_sum(self, c: torch.Tensor) -> torch.Tensor:
        if self.grads is not None:
            return torch.tensordot(c, self.grads, dims=1)
        cg = (self.g * c[:, None, None]).flatten(0, 1)
        return cg.t() @ self.a.flatten(0, 1)

    def materialized(self) -> torch.Tensor | None:
        return self.grads


class EmbeddingRows(PerExample):
    """G_i = sum_t onehot(id_it) g_it^T: never formed (vocabulary x dim per example)."""

    def __init__(self, ids: torch.Tensor, g: torch.Tensor, num_embeddings: int) -> None:
        self.ids, self.g, self.rows = ids.reshape(len(ids), -1), g, num_embeddings

    def norm_sq(self) -> torch.Tensor:
        same = self.ids[:, :, None] == self.ids[:, None, :]
        gram = torch.bmm(self.g, self.g.transpose(1, 2))
        return (gram * same).sum((1, 2))

    def weighted_sum(self, c: torch.Tensor) -> torch.Tensor:
        out = self.g.new_zeros(self.rows, self.g.shape[-1])
        return out.index_add_(0, self.ids.flatten(), (self.g * c[:, None, None]).flatten(0, 1))


def as_sequence(x: torch.Tensor, batch: int, name: str) -> torch.Tensor:
    """(B, ..., d) -> (B, T, d); refuses a tensor whose first dimension is not the batch."""
    if x.dim() < 2 or x.shape[0] != batch:
        raise ValueError(
            f"Fast DP: {name} got a tensor of shape {tuple(x.shape)}; the batch of {batch} "
            "examples should be its first dimension."
        )
    return x.reshape(batch, -1, x.shape[-1])
