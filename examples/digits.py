"""The digits task shared by the examples and benchmarks: data, model and training loop.

scikit-learn's bundled 8x8 handwritten digits (1,797 images, no download). The loop is an
ordinary PyTorch loop with the four synctrain helpers; it runs unchanged in one plain
process (``python examples/digits.py``), under ``mode="sync"`` or under ``mode="async"``.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import synctrain


def load_digits_split(test_fraction: float = 0.2, seed: int = 0):
    """(train_x, train_y, test_x, test_y) as tensors; pixels scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(x), generator=g)
    n_test = int(len(x) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train], x[test], y[test]


class DigitsNet(nn.Module):
    def __init__(self, hidden: int = 128) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                                 nn.ReLU(), nn.Linear(hidden, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        acc = (model(x).argmax(dim=1) == y).float().mean().item()
    model.train()
    return acc


def train_loop(config: dict[str, Any]) -> dict[str, Any]:
    """Config: lr, epochs, batch_size, optimizer ("sgd"|"adam"), slow_rank/slow_s (a straggler)."""
    ctx = synctrain.get_context()
    train_x, train_y, test_x, test_y = load_digits_split()
    torch.manual_seed(config.get("model_seed", 0))
    model = synctrain.prepare_model(DigitsNet(config.get("hidden", 128)))
    if config.get("optimizer", "sgd") == "adam":
        base = torch.optim.Adam(model.parameters(), lr=config.get("lr", 1e-3))
    else:
        base = torch.optim.SGD(model.parameters(), lr=config.get("lr", 0.1), momentum=0.9)
    opt = synctrain.prepare_optimizer(base)
    loader = synctrain.prepare_data_loader(
        DataLoader(TensorDataset(train_x, train_y), batch_size=config.get("batch_size", 32), shuffle=True))
    slow = config.get("slow_rank") == ctx.rank
    samples, started = 0, time.monotonic()
    for epoch in range(config.get("epochs", 10)):
        loss_sum, batches = 0.0, 0  # the epoch's mean loss (a resumed run replays finished
        for x, y in loader:          # epochs as empty ones: nothing read from a batch after it)
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            if slow:
                time.sleep(config.get("slow_s", 0.0))
            samples += len(x) * ctx.world_size
            loss_sum, batches = loss_sum + loss.item(), batches + 1
        acc = evaluate(model, test_x.to(ctx.device), test_y.to(ctx.device))
        synctrain.report({"epoch": epoch, "loss": loss_sum / max(1, batches), "test_acc": acc,
                          "samples": samples, "wall_s": time.monotonic() - started})
    return {"test_acc": evaluate(model, test_x.to(ctx.device), test_y.to(ctx.device)), "rank": ctx.rank}


if __name__ == "__main__":  # one plain process, no Ray: the helpers are no-ops
    out = train_loop({"epochs": 10})
    print(f"single process: test accuracy {out['test_acc']:.3f}")
