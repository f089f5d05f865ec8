"""Teacher recipes: train a classifier from labels on a split. Plain PyTorch, no Ray.

The bundled examples' teachers are trained by the project itself from real data (no hub), so a
recipe is just supervised training with Adam and a cosine learning rate, seeded.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from distill_ray.data import Split
from distill_ray.models import forward_logits


def train_classifier(model: nn.Module, train: Split, *, epochs: int = 3, lr: float = 1e-3, batch_size: int = 128,
                     seed: int = 0, label_smoothing: float = 0.0, desc: str = "train") -> nn.Module:
    """Supervised training from hard labels; returns the same model, in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.as_tensor(train.inputs)
    y = torch.as_tensor(train.labels)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps_per_epoch = math.ceil(len(y) / batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=epochs * steps_per_epoch)
    model.train()
    with tqdm(total=epochs * steps_per_epoch, desc=desc, unit="step", leave=False) as bar:
        for _ in range(epochs):
            order = torch.randperm(len(y), generator=generator)
            for start in range(0, len(y), batch_size):
                idx = order[start:start + batch_size]
                loss = F.cross_entropy(forward_logits(model, x[idx]), y[idx], label_smoothing=label_smoothing)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    return model.eval()


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
