"""``RootReference``: ROOT written the way the paper states it, one matrix and one formula at a time.

This is the specification, not the product: it is slow (a Python loop per parameter, an exact quantile with
``torch.quantile``, every product formed explicitly) and runs in the parameter's dtype, so a float64 model gives a
float64 reference. :class:`root_hf.ROOT` is tested against it step by step. It has the same hyperparameters and the
same parameter groups as :class:`root_hf.ROOT`, but no fast paths, no batching, no diagnostics, no non-finite checks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.optim.optimizer import Optimizer, ParamsT

from ..schedules import DEFAULT_SCHEDULE, ScheduleSpec, get_schedule
from .root import AdjustLrFn, adjusted_lr_ratio

__all__ = ["RootReference"]


def _threshold(abs_u: torch.Tensor, q: float) -> torch.Tensor:
    """``eps_t = Quantile_q(|U_t|)``; if that is 0 (>= q of the entries are exactly 0), the quantile of non-zeros."""
    eps = torch.quantile(abs_u.flatten(), q)
    nonzero = abs_u[abs_u > 0]
    if eps == 0 and nonzero.numel() > 0:
        eps = torch.quantile(nonzero, q)
    return eps


class RootReference(Optimizer):
    """The ROOT algorithm (arXiv 2511.20626) line by line; see :class:`root_hf.ROOT` for the math and arguments.

    Each ROOT step, per matrix ``W`` (viewed as ``(shape[0], -1)``):

    1. ``M = mu * M + G``; ``U = G + mu * M`` (Nesterov) or ``U = M``.
    2. ``eps = Quantile_q(|U|)``; ``O = sign(U) * max(|U| - eps, 0)``; ``B = U - O``.
    3. ``X = B / (||B||_F + eps_ns)``; transpose so rows <= cols; ``K`` times ``A = X X^T``,
       ``X = a X + b A X + c A A X`` with the schedule's ``(a, b, c)`` for that step; transpose back.
    4. ``W = W * (1 - lr * wd) - lr * s(m, n) * X``.

    AdamW branch: ``m = b1 m + (1 - b1) g``, ``v = b2 v + (1 - b2) g^2``,
    ``W = W (1 - lr wd) - lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps_adam)``.

    Example:
        >>> w = torch.nn.Parameter(torch.randn(4, 6, dtype=torch.float64))
        >>> opt = RootReference([w], lr=0.1)
        >>> w.grad = torch.randn_like(w)
        >>> opt.step()
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        clip_quantile: float | None = 0.90,
        ns_steps: int = 5,
        ns_coefficients: ScheduleSpec = DEFAULT_SCHEDULE,
        eps: float = 1e-7,
        adjust_lr_fn: AdjustLrFn = "match_rms_adamw",
        betas: tuple[float, float] = (0.9, 0.95),
        adamw_eps: float = 1e-8,
    ) -> None:
        defaults = dict(
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            nesterov=nesterov,
            clip_quantile=clip_quantile,
            ns_steps=ns_steps,
            ns_coefficients=ns_coefficients,
            eps=eps,
            adjust_lr_fn=adjust_lr_fn,
            betas=betas,
            adamw_eps=adamw_eps,
            use_root=None,
        )
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """A group without ``use_root`` is split by ndim, as in :class:`root_hf.ROOT`."""
        if param_group.get("use_root", self.defaults["use_root"]) is None:
            params = list(param_group["params"])
            for flag in (True, False):
                members = [p for p in params if (p.dim() >= 2) == flag]
                if members:
                    super().add_param_group({**param_group, "params": members, "use_root": flag})
            return
        super().add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Perform one optimization step."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if group["use_root"]:
                    self._root_step(p, group)
                else:
                    self._adamw_step(p, group)
        return loss

    def _root_step(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        lr, wd, mu = group["lr"], group["weight_decay"], group["momentum"]
        G = p.grad.reshape(p.shape[0], -1).to(torch.promote_types(p.dtype, torch.float32))
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(G)
        M = state["momentum_buffer"]
        M.copy_(mu * M + G)  # M_t = mu M_{t-1} + G_t
        U = G + mu * M if group["nesterov"] else M.clone()

        if group["clip_quantile"] is not None:
            eps_t = _threshold(U.abs(), group["clip_quantile"])
            O = torch.sign(U) * torch.clamp(U.abs() - eps_t, min=0)  # outliers, discarded  # noqa: E741
            B = U - O
        else:
            B = U

        K = group["ns_steps"]
        if K > 0:
            X = B / (torch.linalg.matrix_norm(B) + group["eps"])
            transposed = X.shape[0] > X.shape[1]
            if transposed:
                X = X.T
            for a, b, c in get_schedule(group["ns_coefficients"], tuple(p.shape), K):
                A = X @ X.T
                X = a * X + b * (A @ X) + c * (A @ A @ X)
            if transposed:
                X = X.T
        else:
            X = B

        scale = adjusted_lr_ratio(group["adjust_lr_fn"], tuple(p.shape))
        new_p = p.to(X.dtype) * (1 - lr * wd) - lr * scale * X.reshape(p.shape)
        p.copy_(new_p)

    def _adamw_step(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        lr, wd = group["lr"], group["weight_decay"]
        beta1, beta2 = group["betas"]
        g = p.grad.to(torch.promote_types(p.dtype, torch.float32))
        state = self.state[p]
        if "step" not in state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(g)
            state["exp_avg_sq"] = torch.zeros_like(g)
        state["step"] += 1
        t = state["step"]
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m.copy_(beta1 * m + (1 - beta1) * g)
        v.copy_(beta2 * v + (1 - beta2) * g * g)
        m_hat = m / (1 - beta1**t)
        v_hat = v / (1 - beta2**t)
        new_p = p.to(g.dtype) * (1 - lr * wd) - lr * m_hat / (v_hat.sqrt() + group["adamw_eps"])
        p.copy_(new_p)
