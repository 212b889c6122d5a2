"""A small CNN built from torchpool layers: one training step and an inference pass."""
import torch
from torch import nn

import torchpool

model = nn.Sequential(
    nn.Conv2d(1, 32, 3), nn.ReLU(), torchpool.nn.MaxPool2d(2),
    nn.Conv2d(32, 32, 3), nn.ReLU(), torchpool.nn.MaxPool2d(2),
    nn.Flatten(), nn.Linear(800, 128), nn.ReLU(), nn.Linear(128, 10),
)
device = "cuda" if torch.cuda.is_available() else "cpu"
model.to(device)
x = torch.randn(64, 1, 28, 28, device=device)
y = torch.randint(0, 10, (64,), device=device)
opt = torch.optim.Adam(model.parameters(), lr=1e-3)
for step in range(5):
    loss = nn.functional.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    print(f"step {step}: loss {loss.item():.4f}")
print(model)
