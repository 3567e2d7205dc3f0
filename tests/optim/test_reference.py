"""The reference implementation follows the paper's formulas (root_hf/optim/reference.py)."""

import torch

from root_hf import RootReference
from root_hf.schedules import MUON_COEFFICIENTS


def test_reference_single_step_is_the_papers_formula():
    """One step from zero momentum, written out by hand: M = G, U = G + mu G, clip, 1 NS step, scaled update."""
    torch.manual_seed(0)
    W0 = torch.randn(6, 10, dtype=torch.float64)
    G = torch.randn(6, 10, dtype=torch.float64)
    w = torch.nn.Parameter(W0.clone())
    lr, wd, mu = 0.1, 0.01, 0.9
    opt = RootReference([w], lr=lr, weight_decay=wd, momentum=mu, ns_steps=1, ns_coefficients="muon", eps=0.0)
    w.grad = G.clone()
    opt.step()

    U = G + mu * G
    eps = torch.quantile(U.abs().flatten(), 0.9)
    B = U.clamp(-eps, eps)
    X = B / B.norm()
    a, b, c = MUON_COEFFICIENTS
    A = X @ X.T
    X = a * X + b * A @ X + c * A @ A @ X
    expected = W0 * (1 - lr * wd) - lr * 0.2 * 10**0.5 * X
    torch.testing.assert_close(w.detach(), expected, rtol=1e-12, atol=1e-14)


def test_reference_degenerate_case_is_normalized_sgd():
    """K = 0: X_K = X_0 = G / (||G||_F + eps), as `orthogonalize(ns_steps=0)`."""
    w = torch.nn.Parameter(torch.randn(5, 7, dtype=torch.float64))
    w0 = w.detach().clone()
    opt = RootReference([w], lr=0.3, weight_decay=0.0, momentum=0.0, clip_quantile=None, ns_steps=0, adjust_lr_fn=None)
    w.grad = torch.randn_like(w)
    opt.step()
    torch.testing.assert_close(w.detach(), w0 - 0.3 * w.grad / (w.grad.norm() + 1e-7))


def test_reference_adamw_branch_matches_torch_adamw():
    b = torch.nn.Parameter(torch.randn(7, dtype=torch.float64))
    ref_b = torch.nn.Parameter(b.detach().clone())
    opt = RootReference([b], lr=1e-2, weight_decay=0.1)
    adamw = torch.optim.AdamW([ref_b], lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
    for _ in range(5):
        g = torch.randn_like(b)
        b.grad, ref_b.grad = g.clone(), g.clone()
        opt.step()
        adamw.step()
    torch.testing.assert_close(b, ref_b, rtol=1e-12, atol=1e-14)
