"""Students cut from a teacher: depth pruning of a Hugging Face decoder-only causal LM.

The student keeps the teacher's embeddings, the chosen decoder layers (in the teacher's order), the
final norm and the head, with their weights, so it starts from what the teacher knows rather than
from noise (Minitron's recipe: prune, then distil). It is an ordinary transformers model of the
teacher's class with ``num_hidden_layers`` = the layers kept, saved as a normal HF directory.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

from torch import nn


def kept_layers(num_layers: int, layers: Sequence[int] | None = None, keep_every: int | None = None) -> list[int]:
    """The teacher's layer indices a student keeps: ``layers`` as given (sorted, checked), or every
    ``keep_every``-th layer from the first, with the last layer always kept (it writes what the final
    norm and head read)."""
    if (layers is None) == (keep_every is None):
        raise ValueError("give exactly one of layers and keep_every")
    if layers is not None:
        chosen = sorted(set(int(i) for i in layers))
        if not chosen or chosen[0] < 0 or chosen[-1] >= num_layers:
            raise ValueError(f"layers must be indices in [0, {num_layers - 1}] of the teacher's {num_layers}, "
                             f"got {list(layers)}")
        return chosen
    if keep_every < 1:
        raise ValueError(f"keep_every must be >= 1, got {keep_every}")
    return sorted(set(range(0, num_layers, keep_every)) | {num_layers - 1})


def _layer_pattern(model: nn.Module) -> re.Pattern:
    """The state-dict key pattern of the decoder layers: the one ``nn.ModuleList`` holding
    ``num_hidden_layers`` modules (``model.layers`` in Llama/Qwen/Mistral, ``transformer.h`` in GPT-2)."""
    count = model.config.num_hidden_layers
    lists = [name for name, module in model.named_modules() if isinstance(module, nn.ModuleList) and len(module) == count]
    if len(lists) != 1:
        raise ValueError(f"{type(model).__name__}: cannot tell its decoder layers apart "
                         f"(module lists of {count} entries: {lists or 'none'})")
    return re.compile(rf"^{re.escape(lists[0])}\.(\d+)\.(.*)$")


def cut_causal_lm(teacher: nn.Module, layers: Sequence[int]) -> nn.Module:
    """A fresh model of the teacher's class with only ``layers`` (teacher indices, ascending) and
    every other weight copied from the teacher. Per-layer config lists (``layer_types``) follow."""
    from transformers import AutoModelForCausalLM

    config = teacher.config.__class__.from_dict(teacher.config.to_dict())
    total = teacher.config.num_hidden_layers
    layers = kept_layers(total, layers=layers)
    config.num_hidden_layers = len(layers)
    if isinstance(getattr(config, "layer_types", None), list) and len(config.layer_types) == total:
        config.layer_types = [config.layer_types[i] for i in layers]
    student = AutoModelForCausalLM.from_config(config)
    pattern, renumber = _layer_pattern(teacher), {old: new for new, old in enumerate(layers)}
    state = {}
    for key, value in teacher.state_dict().items():
        found = pattern.match(key)
        if found is None:
            state[key] = value
        elif int(found.group(1)) in renumber:
            prefix = key[:found.start(1)]
            state[f"{prefix}{renumber[int(found.group(1))]}.{found.group(2)}"] = value
    missing, unexpected = student.load_state_dict(state, strict=False)
    # Tied heads appear as a missing key of the student whose weight the embedding already holds.
    tied = set(getattr(student, "_tied_weights_keys", None) or ()) if config.tie_word_embeddings else set()
    if unexpected or set(missing) - tied:
        raise ValueError(f"cutting {type(teacher).__name__}: weights left unset {sorted(set(missing) - tied)}, "
                         f"unused {sorted(unexpected)}")
    return student.eval()


def num_layers(model: nn.Module) -> int:
    return int(model.config.num_hidden_layers)


def write_cut_student(teacher_dir: str | Path, out_dir: str | Path, layers: Sequence[int] | None = None,
                      keep_every: int | None = None) -> dict:
    """Cut the teacher saved in ``teacher_dir`` and save the student to ``out_dir`` (safetensors, a plain
    HF directory). Returns what the report shows: layers kept and parameter counts of both."""
    from distill_ray.models import load_model, num_params

    teacher, spec = load_model(teacher_dir)
    if spec.get("task") not in (None, "causal_lm") or not hasattr(teacher, "config"):
        raise ValueError(f"{teacher_dir} is not a Hugging Face causal language model; a student can only be cut "
                         "from one")
    kept = kept_layers(num_layers(teacher), layers, keep_every)
    student = cut_causal_lm(teacher, kept)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    student.save_pretrained(str(out_dir), safe_serialization=True)
    return {"layers": kept, "teacher_layers": num_layers(teacher), "params": num_params(student),
            "teacher_params": num_params(teacher)}


def student_from_teacher(cfg, teacher_dirs: dict, out_dir: str | Path):
    """``(cfg, facts)``: with ``student.init.teacher`` set, the student cut from that teacher into
    ``out_dir`` and the config pointing at it (``student.arch: hf_dir``, ``student.path``), so every
    Train run of the config (student, baseline, sweep trials, ablation rows) starts from the same cut;
    facts are ``write_cut_student``'s plus the teacher's name. Without it, ``(cfg, None)``. The cut is
    deterministic (weights copied, nothing drawn), so cutting again writes the same directory."""
    import dataclasses

    init = cfg.student.init
    if init.teacher is None:
        return cfg, None
    facts = {"teacher": init.teacher, **write_cut_student(teacher_dirs[init.teacher], out_dir, init.layers,
                                                          init.keep_every)}
    student = dataclasses.replace(cfg.student, arch="hf_dir", path=str(Path(out_dir).resolve()))
    return dataclasses.replace(cfg, student=student), facts
