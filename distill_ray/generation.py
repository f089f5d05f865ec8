"""What LLM users read about an instruction-following model: greedy responses to held-out prompts,
their ROUGE-L against the references, and for code whether prompt + response parses. No Ray.

Prompts and references come from the instruction rows themselves (``sources._instructions``): the
prompt is every token before the first labelled position plus that position's input, the reference
the labelled tokens. ROUGE-L is computed on whitespace words of the decoded texts, so models with
different tokenizers are scored alike.
"""

from __future__ import annotations

import ast
import textwrap

import numpy as np
import torch
from torch import nn


def prompts_and_references(inputs: np.ndarray, labels: np.ndarray) -> list[tuple[list[int], list[int]]]:
    """(prompt token ids, reference token ids) of each instruction row; rows with no label are skipped."""
    out = []
    for x, y in zip(np.asarray(inputs), np.asarray(labels)):
        taught = np.flatnonzero(y >= 0)
        if len(taught):
            out.append((x[:taught[0] + 1].tolist(), y[taught].tolist()))
    return out


def lcs_length(a: list, b: list) -> int:
    """Length of the longest common subsequence (dynamic programming over one row)."""
    if not a or not b:
        return 0
    row = [0] * (len(b) + 1)
    for item in a:
        diagonal = 0
        for j, other in enumerate(b, start=1):
            diagonal, row[j] = row[j], diagonal + 1 if item == other else max(row[j], row[j - 1])
    return row[-1]


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 of two texts on whitespace words (Lin 2004, beta = 1)."""
    c, r = candidate.split(), reference.split()
    lcs = lcs_length(c, r)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(c), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


def parses(prompt: str, response: str) -> bool:
    """Whether a function's prompt (signature + docstring) and a generated body parse as Python."""
    try:
        ast.parse(textwrap.dedent(prompt + response))
    except (SyntaxError, ValueError):
        return False
    return True


@torch.no_grad()
def greedy_responses(model: nn.Module, prompts: list[list[int]], max_new_tokens: int, eos_id: int | None,
                     pad_id: int) -> list[list[int]]:
    """Greedy continuations of each prompt (one at a time: no padding to get wrong), cut at eos."""
    inner = getattr(model, "module", model)
    was_training = inner.training
    inner.eval()
    out = []
    for prompt in prompts:
        ids = torch.tensor([prompt], dtype=torch.long)
        generated = inner.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                   do_sample=False, eos_token_id=eos_id, pad_token_id=pad_id)[0, len(prompt):].tolist()
        out.append(generated[:generated.index(eos_id)] if eos_id in generated else generated)
    inner.train(was_training)
    return out


def generation_scores(model: nn.Module, tokenizer, rows: list[tuple[list[int], list[int]]], max_new_tokens: int,
                      code: bool) -> dict[str, float]:
    """Mean ROUGE-L of greedy responses against the references and, for code, the share of responses
    that parse after their prompt, over the rows whose reference does (a tokenizer that does not
    round-trip whitespace, like WordPiece, leaves none: then no ``parses``)."""
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    responses = greedy_responses(model, [p for p, _ in rows], max_new_tokens, eos, pad)
    scores, parsed = [], []
    for (prompt, reference), response in zip(rows, responses):
        text = tokenizer.decode(response, skip_special_tokens=True)
        reference_text = tokenizer.decode([t for t in reference if t != eos], skip_special_tokens=True)
        scores.append(rouge_l(text, reference_text))
        prompt_text = tokenizer.decode(prompt, skip_special_tokens=True)
        if code and parses(prompt_text, reference_text):
            parsed.append(parses(prompt_text, text))
    return {"rouge_l": float(np.mean(scores)), **({"parses": float(np.mean(parsed))} if parsed else {})}


@torch.no_grad()
def batched_greedy_responses(model: nn.Module, prompts: list[list[int]], max_new_tokens: list[int], eos_id: int | None,
                             pad_id: int, batch_size: int = 32) -> list[list[int]]:
    """Greedy continuations of many prompts, each cut at eos and at its own ``max_new_tokens[i]``.

    Prompts go in batches of similar length (sorted, then left-padded with an attention mask, which
    ``generate`` turns into position ids), so a batch wastes little on padding; on CPU this is what
    makes generating for every training row affordable. A batch generates for its longest budget."""
    if len(max_new_tokens) != len(prompts):
        raise ValueError(f"need one max_new_tokens per prompt, got {len(max_new_tokens)} for {len(prompts)} prompts")
    inner = getattr(model, "module", model)
    was_training = inner.training
    inner.eval()
    out: list[list[int]] = [[] for _ in prompts]
    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        budget = max(max_new_tokens[i] for i in rows)
        if budget <= 0:
            continue
        width = max(len(prompts[i]) for i in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, i in enumerate(rows):
            ids[r, width - len(prompts[i]):] = torch.tensor(prompts[i], dtype=torch.long)
            mask[r, width - len(prompts[i]):] = 1
        generated = inner.generate(input_ids=ids, attention_mask=mask, max_new_tokens=budget, do_sample=False,
                                   eos_token_id=eos_id, pad_token_id=pad_id)[:, width:].tolist()
        for r, i in enumerate(rows):
            tokens = generated[r][:max_new_tokens[i]]
            out[i] = tokens[:tokens.index(eos_id)] if eos_id in tokens else tokens
    inner.train(was_training)
    return out


class BlendedLM(nn.Module):
    """The teachers' blend as a language model that ``greedy_responses`` can decode: the next-token
    distribution is the mixture ``sum_k w_k p_k`` of the teachers' (the blend whose perplexity the test
    table reports), and ``generate`` takes its argmax token by token. Every step runs each teacher over
    the whole sequence (no key-value cache): meant for scoring a few dozen held-out prompts."""

    def __init__(self, models: list[nn.Module], weights: list[float] | torch.Tensor):
        super().__init__()
        weights = torch.as_tensor(weights, dtype=torch.float32)
        if len(weights) != len(models) or not (weights >= 0).all() or weights.sum() <= 0:
            raise ValueError(f"need one non-negative weight per model, got {weights.tolist()} for {len(models)}")
        self.models = nn.ModuleList(models)
        self.register_buffer("log_weights", (weights / weights.sum()).log())

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                logits_to_keep: int = 0) -> torch.Tensor:
        """Log-probabilities of the mixture, [B, L, V] (the last ``logits_to_keep`` positions only, when
        set: the vocabulary projection is most of a small model's cost); left padding is masked and
        positioned past."""
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        logp = torch.stack([torch.log_softmax(m(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                                                logits_to_keep=logits_to_keep).logits.float(), -1)
                            for m in self.models])
        return torch.logsumexp(logp + self.log_weights.view(-1, 1, 1, 1), dim=0)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, max_new_tokens: int = 1,
                 do_sample: bool = False, eos_token_id: int | None = None, pad_token_id: int | None = None,
                 **_) -> torch.Tensor:
        """Greedy continuation, prompt included (``transformers``' ``generate`` layout); stops once every
        row has written eos. Tokens after a row's eos are what the mixture says next (callers cut at eos)."""
        if do_sample:
            raise ValueError("BlendedLM decodes greedily only")
        ids = input_ids
        mask = torch.ones_like(ids) if attention_mask is None else attention_mask
        done = torch.zeros(len(ids), dtype=torch.bool)
        for _ in range(max_new_tokens):
            token = self(ids, mask, logits_to_keep=1)[:, -1].argmax(-1, keepdim=True)
            ids, mask = torch.cat([ids, token], 1), torch.cat([mask, torch.ones_like(token)], 1)
            if eos_token_id is not None:
                done |= token[:, 0].cpu() == eos_token_id
                if done.all():
                    break
        return ids
