"""What LLM users read about an instruction-following model: greedy responses to held-out prompts,
their ROUGE-L against the references, and for code whether prompt + response parses; and the one
generator every response in the project comes from (``batched_responses``: evaluation, serving's
/generate, sequence KD's teacher responses, POCL's reference). No Ray.

Prompts and references come from the instruction rows themselves (``preprocess.instruction_rows``): the
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

GENERATE_BATCH = 32  # prompts generated together where many are answered (evaluation, POCL's reference)

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


def generation_scores(model: nn.Module, tokenizer, rows: list[tuple[list[int], list[int]]], max_new_tokens: int,
                      code: bool) -> dict[str, float]:
    """Mean ROUGE-L of greedy responses against the references and, for code, the share of responses
    that parse after their prompt, over the rows whose reference does (a tokenizer that does not
    round-trip whitespace, like WordPiece, leaves none: then no ``parses``)."""
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    responses = batched_responses(model, [p for p, _ in rows], max_new_tokens, eos, pad,
                                  batch_size=GENERATE_BATCH)
    scores, parsed = [], []
    for (prompt, reference), response in zip(rows, responses):
        text = tokenizer.decode(response, skip_special_tokens=True)
        reference_text = tokenizer.decode([t for t in reference if t != eos], skip_special_tokens=True)
        scores.append(rouge_l(text, reference_text))
        prompt_text = tokenizer.decode(prompt, skip_special_tokens=True)
        if code and parses(prompt_text, reference_text):
            parsed.append(parses(prompt_text, text))
    return {"rouge_l": float(np.mean(scores)), **({"parses": float(np.mean(parsed))} if parsed else {})}


class SeededSampling:
    """A ``generate`` logits processor: temperature, top-p, then per-row Gumbel noise from each row's
    own generator, so greedy decoding of the result samples, reproducibly per row.

    Gumbel-max: adding per-row Gumbel noise to the tempered, top-p-filtered scores and taking the
    argmax (``generate``'s greedy path) is a draw from the same distribution as multinomial sampling,
    and a row's draws come from its generator alone, whatever else is in the batch."""

    def __init__(self, temperature: float, top_p: float, generators: list[torch.Generator]):
        self.temperature, self.top_p, self.generators = temperature, top_p, generators

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.float() / self.temperature
        if self.top_p < 1.0:
            ordered, order = scores.sort(-1, descending=True)
            mass_before = ordered.softmax(-1).cumsum(-1) - ordered.softmax(-1)
            drop = torch.zeros_like(scores, dtype=torch.bool).scatter(-1, order, mass_before >= self.top_p)
            scores = scores.masked_fill(drop, float("-inf"))  # the top token always stays (mass before it: 0)
        # One [V] draw per row and step from the row's generator, whoever else is in the batch.
        u = torch.stack([torch.rand(scores.shape[-1], generator=g) for g in self.generators]).to(scores.device)
        return scores - torch.log(-torch.log(u.clamp(1e-20, 1.0 - 1e-7)))


@torch.no_grad()
def batched_responses(model: nn.Module, prompts: list[list[int]], max_new_tokens: int | list[int], eos_id: int | None,
                      pad_id: int, *, batch_size: int | None = None, temperature: float | None = None,
                      top_p: float = 1.0, seeds: list[int] | None = None, keep_eos: bool = False) -> list[list[int]]:
    """Each prompt's response (token ids), cut at its eos and at its own ``max_new_tokens`` (one int
    for all, or one per prompt).

    Prompts are left-padded with an attention mask (``generate`` turns it into position ids; the
    newest token of every row sits at the right edge). ``batch_size=None``: one ``generate`` over the
    prompts as given; else batches of ``batch_size`` prompts of similar length (sorted), so a batch
    wastes little on padding, which on CPU is what makes generating for every training row
    affordable. A batch generates for its longest budget.

    Greedy unless ``temperature`` is given: then sampling at that temperature and ``top_p``, each
    row from its own generator seeded by ``seeds[i]`` (``SeededSampling``), so a response does not
    depend on which rows share its batch. ``keep_eos``: the response ends with its eos (sequence KD:
    the student learns where to stop) rather than before it.

    Only these arguments decide the responses: the model's own generation config (its eos, a
    repetition penalty, sampling defaults) is set aside for the call."""
    from transformers import GenerationConfig, LogitsProcessorList

    limits = list(max_new_tokens) if isinstance(max_new_tokens, (list, tuple)) else [max_new_tokens] * len(prompts)
    if len(limits) != len(prompts):
        raise ValueError(f"need one max_new_tokens per prompt, got {len(limits)} for {len(prompts)} prompts")
    if temperature is not None and (seeds is None or len(seeds) != len(prompts)):
        raise ValueError("sampling needs one seed per prompt (sequence_kd.row_seed)")
    inner = getattr(model, "module", model)  # DDP keeps generate on the wrapped model
    device = next(inner.parameters()).device
    was_training = inner.training
    inner.eval()
    # generate fills every setting left unset (eos None, a penalty) from the model's own generation
    # config (a recipe Llama's default eos is 2, a word of another tokenizer); with a blank one in its
    # place for the call, the arguments here are all that decides the responses.
    own, inner.generation_config = inner.generation_config, GenerationConfig()
    out: list[list[int]] = [[] for _ in prompts]
    order = list(range(len(prompts))) if batch_size is None else \
        sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
    step = batch_size or max(len(order), 1)
    try:
        for start in range(0, len(order), step):
            rows = order[start:start + step]
            budget = max(limits[i] for i in rows)
            if budget <= 0:
                continue
            width = max(len(prompts[i]) for i in rows)
            ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, i in enumerate(rows):
                ids[r, width - len(prompts[i]):] = torch.tensor(prompts[i], dtype=torch.long)
                mask[r, width - len(prompts[i]):] = 1
            processors = LogitsProcessorList()
            if temperature is not None:
                processors.append(SeededSampling(temperature, top_p, [torch.Generator().manual_seed(seeds[i])
                                                                      for i in rows]))
            config = GenerationConfig(max_new_tokens=budget, do_sample=False, eos_token_id=eos_id, pad_token_id=pad_id)
            generated = inner.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                       generation_config=config, logits_processor=processors)[:, width:].cpu().tolist()
            for r, i in enumerate(rows):
                tokens = generated[r][:limits[i]]
                if eos_id is not None and eos_id in tokens:
                    tokens = tokens[:tokens.index(eos_id) + (1 if keep_eos else 0)]
                out[i] = tokens
    finally:
        inner.generation_config = own
        inner.train(was_training)
    return out


class BlendedLM(nn.Module):
    """The teachers' blend as a language model that ``batched_responses`` can decode: the next-token
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
        from transformers import GenerationConfig

        self.generation_config = GenerationConfig()  # batched_responses sets it aside like a model's own

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
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, generation_config=None,
                 logits_processor=None, max_new_tokens: int = 1, do_sample: bool = False,
                 eos_token_id: int | None = None, pad_token_id: int | None = None, **_) -> torch.Tensor:
        """Greedy continuation, prompt included (``transformers``' ``generate`` layout, settings as
        arguments or in a ``generation_config``); stops once every row has written eos. Tokens after a
        row's eos are what the mixture says next (callers cut at eos)."""
        if generation_config is not None:
            max_new_tokens, do_sample = generation_config.max_new_tokens, generation_config.do_sample
            eos_token_id = generation_config.eos_token_id
        if do_sample or logits_processor:
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


@torch.no_grad()
def reverse_kl_on_own_samples(student: nn.Module, teacher: nn.Module, prompts: list[list[int]], max_new_tokens: int,
                              eos_id: int | None, pad_id: int, window: int, seed: int = 0) -> float:
    """Per-token reverse KL(student || teacher) over the full vocabulary at the tokens the student writes
    (sampled at temperature 1, seeded per prompt) after held-out ``prompts``: what on-policy
    distillation at beta 1 minimises, measured where the student itself goes."""
    from distill_ray.kd.on_policy import response_budgets, rollout_batch
    from distill_ray.models import forward_logits

    budgets = response_budgets(prompts, max_new_tokens, window)
    responses = batched_responses(student, prompts, budgets, eos_id, pad_id, temperature=1.0,
                                  seeds=[seed * 100_003 + i for i in range(len(prompts))], keep_eos=True)
    rollout = rollout_batch(prompts, responses, budgets, pad_id, eos_id)
    at = rollout.labels >= 0
    if not at.any():
        return float("nan")
    # the same pad for both: each cuts the same all-padding columns (response positions are never in them)
    logq = torch.log_softmax(forward_logits(student.eval(), rollout.x, pad_id).float(), -1)
    logp = torch.log_softmax(forward_logits(teacher.eval(), rollout.x, pad_id).float(), -1)
    logq, logp = logq[at[:, :logq.shape[1]]], logp[at[:, :logp.shape[1]]]
    return float((logq.exp() * (logq - logp)).sum(-1).mean())
