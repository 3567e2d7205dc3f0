"""`RootReference`: ROOT written the way the paper states it, one matrix and one formula at a time.

This is the specification, not the product: it is slow (a Python loop per parameter, an exact quantile with
`torch.quantile`, every product formed explicitly) and runs in the parameter's dtype, so a float64 model gives a
float64 reference. `root_hf.ROOT` is tested against it step by step. It has the same hyperparameters and the
same parameter groups as `root_hf.ROOT`, but no fast paths, no batching, no diagnostics, no non-finite checks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.optim.optimizer import Optimizer, ParamsT

from ..schedules import ScheduleSpec, get_schedule
from .hyperparams import DEFAULTS, validate_group

__all__ = ["RootReference"]


def _scale(adjust_lr_fn: str | None, m: int, n: int) -> float:
    """`s(m, n)`: Moonlight's matched RMS `0.2 sqrt(max(m, n))`, Muon's `sqrt(max(1, m / n))`, or 1."""
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * max(m, n) ** 0.5
    if adjust_lr_fn == "original":
        return max(1.0, m / n) ** 0.5
    return 1.0


def _matrices(t: torch.Tensor, view: str, split: list[Any] | None) -> list[torch.Tensor]:
    """The independent matrices of `t` as views of it: `"flatten"`: the one matrix `(shape[0], -1)`;
    `"batched"`: one `(out, in)` matrix per index of the leading dims; then each cut into `split`'s blocks."""
    if view == "batched":
        whole = list(t.reshape(-1, t.shape[-2], t.shape[-1]).unbind(0))
    else:
        whole = [t.reshape(t.shape[0], -1)]
    if split is None:
        return whole
    axis, sizes = split
    return [block for w in whole for block in torch.split(w, list(sizes), dim=axis)]


def _threshold(abs_u: torch.Tensor, q: float) -> torch.Tensor:
    """`eps_t = Quantile_q(|U_t|)`; if that is 0 (>= q of the entries are exactly 0), the quantile of non-zeros."""
    eps = torch.quantile(abs_u.flatten(), q)
    nonzero = abs_u[abs_u > 0]
    if eps == 0 and nonzero.numel() > 0:
        eps = torch.quantile(nonzero, q)
    return eps


class RootReference(Optimizer):
    """The ROOT algorithm (arXiv 2511.20626) line by line; see `root_hf.ROOT` for the math and arguments.

    Each ROOT step, per matrix `W` (`matrix_view="flatten"`: the tensor viewed as `(shape[0], -1)`;
    `"batched"`: each `(out, in)` matrix of the last two dims; each cut into the blocks of `matrix_split`):

    1. `M = mu * M + G`; `U = G + mu * M` (Nesterov) or `U = M`.
    2. `eps = Quantile_q(|U|)`; `O = sign(U) * max(|U| - eps, 0)`; `B = U - O`.
    3. `X = B / (||B||_F + eps_ns)`; transpose so rows <= cols; `K` times `A = X X^T`,
       `X = a X + b A X + c A A X` with the schedule's `(a, b, c)` for that step; transpose back.
    4. `W = W * (1 - lr * wd) - lr * s(m, n) * X`.

    AdamW branch: `m = b1 m + (1 - b1) g`, `v = b2 v + (1 - b2) g^2`,
    `W = W (1 - lr wd) - lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps_adam)`.

    Args:
        params: parameters or param groups, as for `root_hf.ROOT` (the same group keys, validated by the same table).
        lr: see `root_hf.ROOT`; every hyperparameter has its name and default (no `ns_dtype`: the reference runs in the
            parameter's dtype, float32 or wider; no `nonfinite_grads` or `process_group`).
        weight_decay: see `root_hf.ROOT`.
        momentum: see `root_hf.ROOT`.
        nesterov: see `root_hf.ROOT`.
        clip_quantile: see `root_hf.ROOT`.
        ns_steps: see `root_hf.ROOT`.
        ns_coefficients: see `root_hf.ROOT`.
        eps: see `root_hf.ROOT`.
        adjust_lr_fn: see `root_hf.ROOT`.
        betas: see `root_hf.ROOT`.
        adamw_eps: see `root_hf.ROOT`.

    Example:
        >>> w = torch.nn.Parameter(torch.randn(4, 6, dtype=torch.float64))
        >>> opt = RootReference([w], lr=0.1)
        >>> w.grad = torch.randn_like(w)
        >>> opt.step()
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = DEFAULTS["lr"],
        weight_decay: float = DEFAULTS["weight_decay"],
        momentum: float = DEFAULTS["momentum"],
        nesterov: bool = DEFAULTS["nesterov"],
        clip_quantile: float | None = DEFAULTS["clip_quantile"],
        ns_steps: int = DEFAULTS["ns_steps"],
        ns_coefficients: ScheduleSpec = DEFAULTS["ns_coefficients"],
        eps: float = DEFAULTS["eps"],
        adjust_lr_fn: str | None = DEFAULTS["adjust_lr_fn"],
        betas: tuple[float, float] = DEFAULTS["betas"],
        adamw_eps: float = DEFAULTS["adamw_eps"],
    ) -> None:
        defaults = dict(
            DEFAULTS,
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
        )
        validate_group(defaults)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group, validated against the hyperparameter table (as `root_hf.ROOT`)."""
        validate_group({**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}})
        super().add_param_group(param_group)
        validate_group(self.param_groups[-1])

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
                use_root = group["use_root"]
                if p.dim() >= 2 if use_root is None else use_root:  # the branch, per parameter
                    self._root_step(p, group)
                else:
                    self._adamw_step(p, group)
        return loss

    def _root_step(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        lr, wd, mu = group["lr"], group["weight_decay"], group["momentum"]
        dtype = torch.promote_types(p.dtype, torch.float32)
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p, dtype=dtype, memory_format=torch.contiguous_format)
        M_all = state["momentum_buffer"]
        M_all.copy_(mu * M_all + p.grad.to(dtype))  # M_t = mu M_{t-1} + G_t (elementwise, so on the whole tensor)
        G_all = p.grad.to(dtype)
        W_all = p.detach().to(dtype).clone()
        W_all.mul_(1 - lr * wd)  # decoupled weight decay, unscaled lr
        view, split = group["matrix_view"], group["matrix_split"]
        for G, M, W in zip(
            _matrices(G_all, view, split), _matrices(M_all, view, split), _matrices(W_all, view, split), strict=True
        ):
            W.sub_(lr * _scale(group["adjust_lr_fn"], *W.shape) * self._direction(G, M, group))
        p.copy_(W_all)

    def _direction(self, G: torch.Tensor, M: torch.Tensor, group: dict[str, Any]) -> torch.Tensor:
        """`X_K` of one matrix from its gradient `G` and momentum `M_t`."""
        U = G + group["momentum"] * M if group["nesterov"] else M.clone()
        if U.numel() == 0:
            return U
        if group["clip_quantile"] is not None:
            eps_t = _threshold(U.abs(), group["clip_quantile"])
            O = torch.sign(U) * torch.clamp(U.abs() - eps_t, min=0)  # outliers, discarded  # noqa: E741
            B = U - O
        else:
            B = U

        K = group["ns_steps"]
        X = B / (torch.linalg.matrix_norm(B) + group["eps"])
        if K == 0:
            return X  # X_K = X_0: the normalized (clipped) momentum, as orthogonalize(ns_steps=0)
        transposed = X.shape[0] > X.shape[1]
        if transposed:
            X = X.T
        for a, b, c in get_schedule(group["ns_coefficients"], tuple(B.shape), K):
            A = X @ X.T
            X = a * X + b * (A @ X) + c * (A @ A @ X)
        return X.T if transposed else X

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
