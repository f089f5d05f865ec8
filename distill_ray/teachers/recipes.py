"""Teacher recipes: train a classifier (or a causal LM, on next-token labels) from labels on a split. Plain PyTorch, no Ray.

The bundled examples' teachers are trained by the project itself from real data (no hub), so a
recipe is just supervised training with Adam and a cosine learning rate, seeded.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from tqdm.auto import tqdm

from distill_ray.data.bundled import Split
from distill_ray.kd.labels import label_smoothing_ce
from distill_ray.models import forward_logits


def _length_bucketed(order: torch.Tensor, lengths: torch.Tensor, batch_size: int,
                     generator: torch.Generator) -> list[torch.Tensor]:
    """Batches of similar-length texts: shuffled order, sorted by length within chunks of 50 batches,
    then the batches shuffled. ``forward_logits`` cuts all-padding columns, so short batches run fast."""
    chunk = batch_size * 50
    batches = []
    for start in range(0, len(order), chunk):
        part = order[start:start + chunk]
        part = part[torch.argsort(lengths[part], stable=True)]
        batches += [part[i:i + batch_size] for i in range(0, len(part), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator)]


def train_classifier(model: nn.Module, train: Split, *, epochs: int = 3, lr: float = 1e-3, batch_size: int = 128,
                     seed: int = 0, label_smoothing: float = 0.0, desc: str = "train",
                     param_groups: list[dict] | None = None, weight_decay: float = 1e-4,
                     pad_id: int | None = 0) -> nn.Module:
    """Supervised training from hard labels; returns the same model, in eval mode.

    ``param_groups`` (each with its own ``lr``) replace "all parameters at ``lr``". Integer inputs are
    token ids: batches are then drawn length-bucketed (texts of similar length together, pad ``pad_id``).
    """
    generator = torch.Generator().manual_seed(seed)
    x = torch.as_tensor(train.inputs)
    y = torch.as_tensor(train.labels)
    groups = param_groups or [{"params": [p for p in model.parameters() if p.requires_grad], "lr": lr}]
    optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(y) / batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=[g["lr"] for g in groups],
                                                   total_steps=epochs * steps_per_epoch)
    lengths = (x != pad_id).sum(1) if not x.is_floating_point() and x.dim() == 2 and pad_id is not None else None
    model.train()
    with tqdm(total=epochs * steps_per_epoch, desc=desc, unit="step", leave=False) as bar:
        for _ in range(epochs):
            order = torch.randperm(len(y), generator=generator)
            batches = (_length_bucketed(order, lengths, batch_size, generator) if lengths is not None
                       else [order[i:i + batch_size] for i in range(0, len(y), batch_size)])
            for idx in batches:
                logits = forward_logits(model, x[idx])
                # A causal LM's logits may be narrower than its labels (all-padding columns are cut).
                loss = label_smoothing_ce(logits, y[idx][:, :logits.shape[1]] if logits.dim() == 3 else y[idx],
                                          smoothing=label_smoothing)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    return model.eval()


def encoder_param_groups(model: nn.Module, lr: float, head_lr: float | None = None,
                         train_top_layers: int | None = None) -> list[dict]:
    """Parameter groups for fine-tuning a pretrained transformers encoder classifier (BERT-like).

    The encoder (embeddings + layers) trains at ``lr``, everything else (pooler, classifier head) at
    ``head_lr`` (default ``lr``). With ``train_top_layers = n`` the embeddings and all but the top
    ``n`` layers are frozen (``requires_grad=False``): backward then stops below them, which is what
    makes fine-tuning affordable on a few CPU cores.
    """
    base = getattr(model, "base_model", model)
    layers = getattr(getattr(base, "encoder", None), "layer", None)
    if train_top_layers is not None:
        if layers is None:
            raise ValueError(f"train_top_layers needs a BERT-like encoder (base_model.encoder.layer); "
                             f"got {type(model).__name__}")
        frozen = [getattr(base, "embeddings", None), *list(layers)[:max(0, len(layers) - int(train_top_layers))]]
        for module in frozen:
            for p in (module.parameters() if module is not None else ()):
                p.requires_grad_(False)
    encoder_ids = {id(p) for m in (getattr(base, "embeddings", None), getattr(base, "encoder", None))
                   if m is not None for p in m.parameters()}
    encoder = [p for p in model.parameters() if p.requires_grad and id(p) in encoder_ids]
    head = [p for p in model.parameters() if p.requires_grad and id(p) not in encoder_ids]
    return [g for g in ({"params": encoder, "lr": lr}, {"params": head, "lr": head_lr or lr}) if g["params"]]


def train_recipe(model: nn.Module, train: Split, options: dict, *, seed: int = 0, desc: str = "train",
                 pad_id: int | None = 0) -> nn.Module:
    """Train a teacher with the recipe settings in ``options``: ``epochs`` (3), ``lr`` (2e-3),
    ``batch_size`` (128), ``weight_decay`` (1e-4); for pretrained encoders also ``head_lr`` and
    ``train_top_layers`` (see ``encoder_param_groups``). Frozen layers are unfrozen again afterwards."""
    lr = float(options.get("lr", 2e-3))
    groups = None
    if "head_lr" in options or "train_top_layers" in options:
        top = options.get("train_top_layers")
        groups = encoder_param_groups(model, lr, float(options["head_lr"]) if "head_lr" in options else None,
                                      int(top) if top is not None else None)
    train_classifier(model, train, epochs=int(options.get("epochs", 3)), lr=lr,
                     batch_size=int(options.get("batch_size", 128)), seed=seed, desc=desc, param_groups=groups,
                     weight_decay=float(options.get("weight_decay", 1e-4)), pad_id=pad_id)
    for p in model.parameters():
        p.requires_grad_(True)
    return model.eval()
