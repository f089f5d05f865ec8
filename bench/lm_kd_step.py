"""The causal-LM KD term's cost: the product's ``objectives.token_kd_loss`` (vocabulary-wide math on the
trained positions only) against the same loss over every position with a mask (how it was computed
before), side by side in one process, plus the task loss's cross-entropy for scale.

    .venv/bin/python bench/lm_kd_step.py [--batch 16] [--length 128] [--vocab 49152] [--teachers 2]
                                         [--topk 32] [--trained 0.45] [--rounds 5] [--threads 1]

An instruction batch: ``--batch`` sequences of ``--length`` tokens, ``--trained`` of the positions
response tokens (the rest prompt or padding, label -100), SmolLM2's vocabulary by default, each teacher
a random top-k. Each round times forward + backward of both in alternation; medians after a warm-up
round. Both give the same loss and gradient (``tests/test_causal_lm.py``); the bench checks the loss.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
import torch.nn.functional as F

from distill_ray.kd.blending import TeacherBlend
from distill_ray.config import config_from_dict
from distill_ray.kd.losses import topk_kd_divergence
from distill_ray.kd.objectives import TokenTopK, token_kd_loss


def masked_full(cfg, weights, student, logp, idx, labels, temperature):
    """The KD term over every position, masked: each teacher's divergence on the whole [B, L, V]."""
    aligned = ~torch.isnan(logp[..., 0])
    logp = torch.where(aligned.unsqueeze(-1), logp, torch.full_like(logp, -math.log(logp.shape[-1])))
    return sum(weights[k] * topk_kd_divergence(student, logp[k], idx[k], kind=cfg.loss.kind, temperature=temperature,
                                               mask=(labels >= 0) & aligned[k]) for k in range(len(logp)))


def timed(fn, student) -> float:
    student.grad = None
    start = time.perf_counter()
    fn().backward()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--teachers", type=int, default=2)
    parser.add_argument("--topk", type=int, default=32)
    parser.add_argument("--trained", type=float, default=0.45, help="share of positions with a label")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = config_from_dict({"name": "bench", "data": {"format": "python_stdlib", "task": "causal_lm", "tokenizer": "minilm"},
                            "teachers": [{"name": f"t{i}", "source": "hf_dir", "path": "unused"}
                                         for i in range(args.teachers)],
                            "student": {"arch": "hf_causal_lm"}, "loss": {"topk": args.topk},
                            "curriculum": {"measurers": ["teacher_ce"]}})
    B, L, V, K = args.batch, args.length, args.vocab, args.teachers
    labels = torch.randint(0, V, (B, L))
    trained = torch.rand(B, L) < args.trained
    labels[~trained] = -100
    student = torch.randn(B, L, V, requires_grad=True)
    logp = torch.randn(K, B, L, args.topk).log_softmax(-1) - 0.1  # a tail of ~10% mass
    idx = torch.stack([torch.randperm(V)[:args.topk] for _ in range(K * B * L)]).view(K, B, L, args.topk)
    blend = TeacherBlend("learned_global", K)
    weights = blend.mean_weights().detach()
    product = lambda: token_kd_loss(cfg, blend, student, TokenTopK(logp, idx), labels, 1.0)  # noqa: E731
    full = lambda: masked_full(cfg, weights, student, logp, idx, labels, 1.0)  # noqa: E731
    task = lambda: F.cross_entropy(student.view(-1, V), labels.view(-1), ignore_index=-100)  # noqa: E731
    assert torch.allclose(product(), full(), rtol=1e-5), "the two computations disagree"
    times = {"token_kd_loss (trained positions)": [], "masked, every position": [], "task cross-entropy": []}
    for r in range(args.rounds + 1):
        for (name, fn) in zip(times, (product, full, task)):
            t = timed(fn, student)
            if r:
                times[name].append(t)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    print(f"{B} x {L} tokens ({trained.float().mean():.0%} trained), vocabulary {V:,}, {K} teachers, top-{args.topk}, "
          f"{args.threads} thread(s), median of {args.rounds} rounds, forward + backward:")
    for name, m in med.items():
        print(f"  {name:<34} {m:8.3f} s")
    print(f"masked-every-position / token_kd_loss time: {med['masked, every position'] / med['token_kd_loss (trained positions)']:.2f}; "
          f"token_kd_loss / task cross-entropy: {med['token_kd_loss (trained positions)'] / med['task cross-entropy']:.2f}")


if __name__ == "__main__":
    main()
