"""Every model scored on the test split: the teachers (from the cache, or run exactly for language
models), their blend at the final weights, the baseline and the student; and the final table."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from distill_ray.cache.build import teacher_columns
from distill_ray.config import ExperimentConfig
from distill_ray.models import load_model, num_params
from distill_ray.evaluation.report import final_teacher_weights
from distill_ray.cache.soft_targets import CachedData


def split_outputs(dataset, models: dict, causal: bool) -> tuple[dict, torch.Tensor, torch.Tensor | None]:
    """Every model's outputs over a split streamed from a Ray Dataset with ``x`` and ``label``
    columns: logits [N, C], or for a causal LM (label log-probabilities, top-1 ids), each [N, S];
    the labels; the first input (for latency), None on an empty split."""
    from distill_ray.evaluation.metrics import lm_label_logprobs, predict_logits

    batches_of: dict[str, list] = {name: [] for name in models}
    labels, example = [], None
    for batch in dataset.iter_batches(batch_size=64 if causal else 1024, batch_format="numpy"):
        x, y = torch.from_numpy(np.array(batch["x"])), torch.from_numpy(np.array(batch["label"]))
        example = x[:1] if example is None else example
        labels.append(y)
        for name, model in models.items():
            batches_of[name].append(lm_label_logprobs(model, x, y) if causal else predict_logits(model, x))
    outputs = {name: tuple(torch.cat(p) for p in zip(*got)) if causal else torch.cat(got) for name, got in batches_of.items()}
    return outputs, torch.cat(labels), example


def evaluate_language_models(cfg: ExperimentConfig, cache: CachedData, dirs: dict[str, Path], student,
                             baseline, history: list[dict]) -> tuple[dict[str, dict], dict]:
    """Test perplexity and next-token accuracy of every teacher (run exactly, not from the top-k
    cache), their learned blend, the baseline and the student, streamed over the test split."""
    from distill_ray.evaluation.metrics import lm_scores, perplexity, single_sample_latency_ms

    # A teacher with a tokenizer of its own reads other tokens: its perplexity is not one on the student's
    # tokens, so it is scored on the test split tokenized its way (own_perplexity, a note under the table)
    # and the blend, when it is in it, is left out.
    same = [t.name for t in cfg.teachers if t.tokenizer is None]
    models = {name: load_model(dirs[name])[0] for name in same}
    models.update({name: m for name, m in (("student", student), ("baseline", baseline)) if m is not None})
    outputs, y, example = split_outputs(cache.dataset("test", ["x", "label"]), models, causal=True)
    weights = torch.tensor(list(final_teacher_weights(history).values()))
    rows: dict[str, dict] = {}
    for name, model in models.items():
        rows[name] = {**lm_scores(*outputs[name], y), "params": num_params(model),
                      "latency_ms": single_sample_latency_ms(model, example, repeats=20, warmup=3)}
    if len(same) == len(cfg.teachers):
        teacher_logp = torch.stack([outputs[name][0] for name in same])
        blend_logp = torch.logsumexp(teacher_logp + weights.log().view(-1, 1, 1), dim=0)
        rows["blend"] = {"perplexity": perplexity(blend_logp, y), "accuracy": None}
    if is_instruction_data(cfg):
        for name, scores in instruction_scores(cfg, cache, models).items():
            rows[name].update(scores)
    for t in cfg.teachers:
        if t.tokenizer is not None:
            rows[t.name] = own_tokenizer_scores(cfg, cache, t.name, t.tokenizer, dirs[t.name])
    return {name: rows[name] for name in (*cfg.teacher_names(), "blend", "student", "baseline") if name in rows}, {}


def language_model_scores(cfg: ExperimentConfig, cache: CachedData, models: dict) -> dict[str, dict[str, float]]:
    """Each model's test perplexity and next-token accuracy (streamed over the test split) and, on
    instruction data, the ROUGE-L (and for code, parses) of its greedy responses: the figures of an
    instruction run's test table, without sizes and latencies (the ablation scores its rows with it)."""
    from distill_ray.evaluation.metrics import lm_scores

    outputs, y, _ = split_outputs(cache.dataset("test", ["x", "label"]), models, causal=True)
    rows = {name: lm_scores(*outputs[name], y) for name in models}
    if is_instruction_data(cfg):
        for name, scores in instruction_scores(cfg, cache, models).items():
            rows[name].update(scores)
    return rows


GENERATION_ROWS = 32  # held-out prompts each model answers greedily (CPU generation is token by token)


def is_instruction_data(cfg: ExperimentConfig) -> bool:
    d = cfg.data
    return d.task == "causal_lm" and bool(d.prompt_field or d.messages_field or d.format == "python_functions")


def instruction_scores(cfg: ExperimentConfig, cache: CachedData, models: dict) -> dict[str, dict[str, float]]:
    """ROUGE-L of each model's greedy responses to the first GENERATION_ROWS test prompts, and for code
    (python_functions) the share that parse: ``generation.generation_scores``."""
    from distill_ray.data.bundled import load_tokenizer
    from distill_ray.lm.generation import generation_scores, prompts_and_references

    batch = cache.dataset("test", ["x", "label"]).take_batch(GENERATION_ROWS, batch_format="numpy")
    rows = prompts_and_references(np.array(batch["x"]), np.array(batch["label"]))
    tokenizer = load_tokenizer(cache.spec.tokenizer)
    longest = max(len(reference) for _, reference in rows)
    return {name: generation_scores(model, tokenizer, rows, max_new_tokens=longest,
                                    code=cfg.data.format == "python_functions") for name, model in models.items()}


def own_tokenizer_scores(cfg: ExperimentConfig, cache: CachedData, name: str, tokenizer: str,
                         directory: Path) -> dict:
    """A teacher with a tokenizer of its own, on the test split tokenized its way (``teacher_data``):
    its perplexity and next-token accuracy per token of its own (``own_perplexity``, ``own_accuracy``: not
    comparable with the student's), size, latency and, for instruction data, ROUGE-L (and parses) of its
    greedy responses to the same held-out prompts as the other models, decoded by its tokenizer."""
    from distill_ray.data.bundled import load_tokenizer
    from distill_ray.evaluation.metrics import lm_scores, single_sample_latency_ms
    from distill_ray.lm.generation import generation_scores, prompts_and_references
    from distill_ray.teachers.setup import teacher_data

    data = teacher_data(cfg, tokenizer)
    model = load_model(directory)[0]
    outputs, y, example = split_outputs(data.test.select_columns(["x", "label"]), {name: model}, causal=True)
    scores = lm_scores(*outputs[name], y)
    row = {"own_perplexity": scores["perplexity"], "own_accuracy": scores["accuracy"], "own_tokenizer": tokenizer,
           "params": num_params(model), "latency_ms": single_sample_latency_ms(model, example, repeats=20, warmup=3)}
    if is_instruction_data(cfg):
        ids = set(cache.dataset("test", ["id"]).take_batch(GENERATION_ROWS, batch_format="numpy")["id"].tolist())
        batch = data.test.map_batches(_rows_with_ids, fn_kwargs={"ids": sorted(ids)}, batch_format="numpy") \
            .take_batch(GENERATION_ROWS, batch_format="numpy")
        pairs = prompts_and_references(np.array(batch["x"]), np.array(batch["label"]))
        if pairs:
                row.update(generation_scores(model, load_tokenizer(data.info.tokenizer), pairs,
                                         max_new_tokens=max(len(reference) for _, reference in pairs),
                                         code=cfg.data.format == "python_functions"))
    return row


def _rows_with_ids(batch: dict[str, np.ndarray], ids: list[int]) -> dict[str, np.ndarray]:
    wanted = np.isin(batch["id"], ids)
    return {k: np.asarray(v)[wanted] for k, v in batch.items()}


def classifier_outputs(cfg: ExperimentConfig, cache: CachedData, split: str, models: dict):
    """Streamed over a cached split: the teachers' logits [K, N, C] (from the cache), each model's
    logits [N, C] and the labels [N]. Unlabeled rows are left out (they have nothing to score)."""
    from distill_ray.evaluation.metrics import predict_logits
    from distill_ray.kd.objectives import teacher_signal

    names = cfg.teacher_names()
    teacher_parts, model_parts, labels = [], {name: [] for name in models}, []
    for batch in cache.dataset(split, ["x", "label", *teacher_columns(names, cache.spec.topk)]).iter_batches(
            batch_size=1024, batch_format="numpy"):
        cols = {k: torch.from_numpy(np.array(v)) for k, v in batch.items()}
        labeled = cols["label"] >= 0
        cols = {k: v[labeled] for k, v in cols.items()}
        labels.append(cols["label"])
        if names:  # self-distillation may leave no teacher outside the student
            teacher_parts.append(teacher_signal(cols, names, cache.spec.num_classes, cache.spec.topk, False,
                                                "cpu").logits)
        for name, model in models.items():
            model_parts[name].append(predict_logits(model, cols["x"]))
    labels = torch.cat(labels)
    teachers = torch.cat(teacher_parts, dim=1) if names else torch.zeros(0, len(labels), cache.spec.num_classes)
    return teachers, {n: torch.cat(p) for n, p in model_parts.items()}, labels


def evaluate_classifiers(cfg: ExperimentConfig, cache: CachedData, dirs: dict[str, Path], student, baseline,
                         history: list[dict]) -> tuple[dict[str, dict], dict]:
    """Test accuracy, balanced accuracy, per-class recall (``recall``), ECE, size and latency of every
    teacher (from the cache), their blend, the baseline and the student, streamed over the test split;
    plus each one's test probabilities for the reliability diagram."""
    from distill_ray.kd.blending import blend_probs
    from distill_ray.evaluation.metrics import classifier_scores, per_class_recall, single_sample_latency_ms

    models = {"student": student, **({"baseline": baseline} if baseline is not None else {})}
    teachers, outputs, y = classifier_outputs(cfg, cache, "test", models)
    example = torch.from_numpy(np.array(cache.dataset("test", ["x"]).take_batch(1, batch_format="numpy")["x"]))
    rows: dict[str, dict] = {}
    test_probs = {t.name: teachers[k].float().softmax(-1) for k, t in enumerate(cfg.teachers)}
    test_probs.update({name: outputs[name].softmax(-1) for name in models})
    for k, t in enumerate(cfg.teachers):
        model, _ = load_model(dirs[t.name])
        rows[t.name] = {**classifier_scores(test_probs[t.name], y), "params": num_params(model),
                        "latency_ms": single_sample_latency_ms(model, example)}
    if cfg.teachers:  # the blend of the teachers outside the student (a self_ema teacher is not scored)
        learned = final_teacher_weights(history)
        blend = blend_probs(teachers, torch.tensor([learned[t.name] for t in cfg.teachers]), temperature=1.0)
        rows["blend"] = {**classifier_scores(blend, y), "recall": per_class_recall(blend, y, cache.spec.num_classes)}
    for name, model in models.items():
        rows[name] = {**classifier_scores(test_probs[name], y), "params": num_params(model),
                      "latency_ms": single_sample_latency_ms(model, example)}
    for name, probs in test_probs.items():
        rows[name]["recall"] = per_class_recall(probs, y, cache.spec.num_classes)
    return rows, {name: (p.numpy(), y.numpy()) for name, p in test_probs.items()}


TRAIN_FIT_ROWS = 5000  # train rows (a seeded sample of a larger split) the student's fit is measured on


def train_accuracy(cache: CachedData, model, rows: int = TRAIN_FIT_ROWS) -> float | None:
    """A classifier's accuracy on the labeled rows of the cached train split, at the weights it is
    reported with (eval mode): how well it fits the data it learned from (the verdict compares it with
    the teachers). Above ``rows`` train rows, on a seeded sample of about that many: the figure is
    read to a point, and a split of millions need not pass through the student again. None without
    labeled train rows."""
    from distill_ray.evaluation.metrics import predict_logits

    dataset, total = cache.dataset("train", ["x", "label"]), cache.rows("train")
    if total > rows:  # a sample across the split: its storage order may follow the classes
        dataset = dataset.random_sample(rows / total, seed=0)
    right = seen = 0
    for batch in dataset.iter_batches(batch_size=1024, batch_format="numpy"):
        y = torch.from_numpy(np.array(batch["label"]))
        labeled = y >= 0
        if labeled.any():
            x = torch.from_numpy(np.array(batch["x"]))[labeled]
            right += int((predict_logits(model, x).argmax(-1) == y[labeled]).sum())
            seen += int(labeled.sum())
    return right / seen if seen else None


def print_summary(rows: dict[str, dict], teachers: tuple[str, ...], weights: dict[str, float],
                  metric: str = "accuracy", gap: float | None = None) -> None:
    lm = metric == "perplexity"
    first, second = ("perplexity", "tok acc") if lm else ("test acc", "ECE")
    generated = [key for key in ("rouge_l", "parses") if any(key in r for r in rows.values())]
    extra = "".join(f"{'ROUGE-L' if key == 'rouge_l' else 'parses':>9}" for key in generated)
    print(f"\n{'model':<12}{first:>11}{second:>9}{extra}{'params':>13}{'latency ms':>12}{'weight':>8}")
    for name in (*teachers, "blend", "baseline", "student"):
        if name not in rows:
            continue
        r = rows[name]
        a, b = (r.get("perplexity"), r.get("accuracy")) if lm else (r.get("accuracy"), r.get("ece"))
        params = f"{r['params']:,}" if "params" in r else "-"
        latency = f"{r['latency_ms']:.3f}" if "latency_ms" in r else "-"
        weight = f"{weights[name]:.3f}" if name in weights else ""
        first_cell = f"{a:.4f}" if a is not None else "-"
        second_cell = f"{b:.4f}" if b is not None else "-"
        extra = "".join(f"{r[key]:>9.4f}" if key in r else f"{'-':>9}" for key in generated)
        print(f"{name:<12}{first_cell:>11}{second_cell:>9}{extra}{params:>13}{latency:>12}{weight:>8}")
    for name in teachers:
        if "own_perplexity" in rows.get(name, {}):
            print(f"{name}: perplexity {rows[name]['own_perplexity']:.4f}, tok acc {rows[name]['own_accuracy']:.4f} "
                  f"per token of its own tokenizer ({rows[name]['own_tokenizer']}): not comparable with the column")
    if "baseline" in rows:
        print(f"gap recovered (student - baseline) / (best teacher - baseline): "
              f"{'n/a (no teacher beats the baseline)' if gap is None else f'{gap:.1%}'}")
