"""What a student cut from a teacher starts from: test perplexity of cuts of one causal-LM teacher,
before any training, beside the teacher and a fresh model of the cut's shape.

    python jobs/cut_perplexity.py jobs/configs/python_lm.yaml --teacher smollm2 --keep-every 2,3,6

Reads the config's data (its test split) and the named teacher (a recipe teacher is trained first,
as a run would); prints one table row per model. Nothing is trained here but a recipe teacher.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--teacher", required=True, help="the teacher to cut (a causal LM on the student's tokenizer)")
    parser.add_argument("--keep-every", default="2,3,6", help="comma-separated keep_every values, one cut each")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)

    import torch

    from distill_ray.config import apply_overrides, config_from_dict, load_config, config_to_dict
    from distill_ray.evaluation.metrics import lm_label_logprobs, perplexity
    from distill_ray.lm.cut import cut_causal_lm, kept_layers
    from distill_ray.models import load_model, num_params
    from distill_ray.pipeline import connect_ray, load_data, prepare_teachers

    cfg = load_config(args.config, args.set)
    keep = [t for t in cfg.teachers if t.name == args.teacher]
    if not keep:
        parser.error(f"no teacher named {args.teacher!r}; teachers: {', '.join(cfg.teacher_names())}")
    cfg = config_from_dict(apply_overrides(config_to_dict(cfg), [("teachers", [config_to_dict(keep[0])])]))
    connect_ray(None)
    data = load_data(cfg)
    teacher, _ = load_model(prepare_teachers(cfg, data)[args.teacher])
    test = data.test.to_pandas()
    import numpy as np

    x, y = np.stack(test["x"].to_numpy()), np.stack(test["label"].to_numpy())
    tokens = int((y >= 0).sum())
    print(f"{cfg.name}: test split {len(x)} rows, {tokens:,} scored tokens; teacher {args.teacher}, "
          f"{teacher.config.num_hidden_layers} layers", flush=True)
    print("| model | layers kept | params | test perplexity | seconds |\n|---|---|---:|---:|---:|")

    def row(name: str, model, layers: str) -> None:
        start = time.perf_counter()
        with torch.no_grad():
            logp, _ = lm_label_logprobs(model, x, y)
        print(f"| {name} | {layers} | {num_params(model):,} | {perplexity(logp, y):,.2f} | "
              f"{time.perf_counter() - start:.0f} |", flush=True)

    total = teacher.config.num_hidden_layers
    row(f"{args.teacher} (teacher)", teacher, f"all {total}")
    for every in (int(v) for v in args.keep_every.split(",")):
        layers = kept_layers(total, keep_every=every)
        cut = cut_causal_lm(teacher, layers)
        row(f"cut, keep_every {every}", cut, f"{len(layers)}: {layers}")
        from transformers import AutoModelForCausalLM

        torch.manual_seed(0)
        row(f"fresh model of that shape (keep_every {every})", AutoModelForCausalLM.from_config(cut.config).eval(),
            f"{len(layers)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
