"""Train a small MLP regressor with ROOT and with AdamW, and print both loss curves' endpoints.

Run:  python examples/quickstart.py
"""

import torch

from root_hf import ROOT


def train(make_optimizer, steps: int = 200, seed: int = 0) -> list[float]:
    torch.manual_seed(seed)
    x = torch.randn(512, 32)
    y = torch.sin(x @ torch.randn(32, 4))
    model = torch.nn.Sequential(torch.nn.Linear(32, 128), torch.nn.GELU(), torch.nn.Linear(128, 4))
    opt = make_optimizer(model)
    losses = []
    for _ in range(steps):
        loss = (model(x) - y).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


if __name__ == "__main__":
    runs = {
        "ROOT": lambda m: ROOT(m.parameters(), lr=2e-2, weight_decay=0.0),
        "AdamW": lambda m: torch.optim.AdamW(m.parameters(), lr=2e-2, weight_decay=0.0),
    }
    print(f"{'optimizer':<10}{'loss@0':>10}{'loss@50':>10}{'loss@200':>10}")
    for name, make in runs.items():
        losses = train(make)
        print(f"{name:<10}{losses[0]:>10.4f}{losses[49]:>10.4f}{losses[-1]:>10.4f}")
