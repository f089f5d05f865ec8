"""The preprocessing stages: the row stage's ``id``, ``split``, ``label`` and input columns made into the
model input ``x``, per kind (Ray Data ``map_batches`` functions: plain numpy, a tokenizer or PIL, no Ray).

- tabular: the feature columns stacked and standardised with the train split's statistics;
- image: decoded, converted and resized to one shape, float32 [C, H, W] in [0, 1];
- text: token ids padded to ``data.max_length``; causal LM: each text's token stream cut into windows;
  instruction data: prompt + response as one sequence, labels on the response only.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from distill_ray.data.chat import render_chat_prompt
from distill_ray.data.rows import IGNORE_LABEL, SPLITS, DataError, apply_standardise, hash_to_id
from distill_ray.extras import require

@functools.lru_cache(maxsize=4)
def _tokenizer(directory: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory, local_files_only=True)


def tokenize_rows(batch: dict[str, np.ndarray], text_field: str, tokenizer: str, max_length: int) -> dict[str, np.ndarray]:
    tok = _tokenizer(tokenizer)
    texts = ["" if t is None else str(t) for t in batch[text_field]]
    enc = tok(texts, padding="max_length", truncation=True, max_length=max_length,
              return_attention_mask=False, return_token_type_ids=False)
    return {"id": batch["id"], "x": np.asarray(enc["input_ids"], dtype=np.int64).reshape(len(texts), max_length),
            "label": batch["label"], "split": batch["split"]}


def token_windows(tok, text: str, length: int) -> Iterator[tuple[int, list[int], list[int]]]:
    """Causal LM: ``text``'s token stream cut into windows of ``length`` tokens and their next tokens
    (stride ``length``, so every label is real and nothing is padded; a tail shorter than a window is
    dropped). Yields (window number, input ids, label ids): the one windowing of user text
    (``window_rows``) and of the bundled Python source (``bundled.load_python_corpus``)."""
    stream = tok(text, add_special_tokens=False, return_attention_mask=False, return_token_type_ids=False,
                 verbose=False)["input_ids"]
    for number, start in enumerate(range(0, len(stream) - length, length)):
        window = stream[start:start + length + 1]
        yield number, window[:-1], window[1:]


def window_rows(batch: dict[str, np.ndarray], text_field: str, tokenizer: str, max_length: int) -> dict[str, np.ndarray]:
    """Causal LM: each text's ``token_windows`` as rows, ids hashed from the text's id and the window number."""
    tok = _tokenizer(tokenizer)
    xs, ys, ids, splits = [], [], [], []
    for text, text_id, split in zip(batch[text_field], batch["id"], batch["split"]):
        for number, inputs, labels in token_windows(tok, str(text), max_length):
            xs.append(inputs)
            ys.append(labels)
            ids.append(f"{text_id}/{number}")
            splits.append(split)
    shape = (len(xs), max_length)
    return {"id": hash_to_id(ids) if ids else np.zeros(0, np.int64),
            "x": np.asarray(xs, dtype=np.int64).reshape(shape), "label": np.asarray(ys, dtype=np.int64).reshape(shape),
            "split": np.asarray(splits, dtype=object).astype(str)}


def instruction_rows(batch: dict[str, np.ndarray], fields: tuple[str, ...], tokenizer: str, max_length: int,
                  pad_id: int) -> dict[str, np.ndarray]:
    """Causal-LM instruction data: prompt + response as one sequence of ``max_length`` tokens (+1 for the
    shifted labels), right-padded with ``pad_id``. Labels are the next tokens of the response only
    (prompt and padding positions are IGNORE_LABEL); ``cut`` marks sequences longer than max_length.
    ``fields`` is (prompt column, response column), or (messages column,) of chat turns rendered with
    the tokenizer's chat template."""
    tok = _tokenizer(tokenizer)
    n = len(batch["id"])
    xs = np.full((n, max_length), pad_id, np.int64)
    ys = np.full((n, max_length), IGNORE_LABEL, np.int64)
    cut = np.zeros(n, bool)
    pairs = [_prompt_and_response(batch, i, fields, tok) for i in range(n)]
    # one tokenizer call per column: the fast tokenizer's batch path
    encode = functools.partial(tok, add_special_tokens=False, return_attention_mask=False, verbose=False)
    prompt_rows = encode([p for p, _ in pairs])["input_ids"] if n else []
    response_rows = encode([r for _, r in pairs])["input_ids"] if n else []
    for i, (prompt_ids, response_ids) in enumerate(zip(prompt_rows, response_rows)):
        if len(fields) == 2 and tok.eos_token_id is not None:
            response_ids = response_ids + [tok.eos_token_id]  # the model learns where a response ends
        seq = prompt_ids + response_ids
        cut[i] = len(seq) > max_length + 1
        seq = seq[:max_length + 1]
        xs[i, :len(seq) - 1] = seq[:-1]
        # position j predicts token j + 1: the response's tokens are the labels from len(prompt) - 1 on
        start = max(len(prompt_ids) - 1, 0)
        ys[i, start:len(seq) - 1] = seq[start + 1:]
    return {"id": batch["id"], "x": xs, "label": ys, "split": batch["split"], "cut": cut}


def _prompt_and_response(batch: dict[str, np.ndarray], i: int, fields: tuple[str, ...], tok) -> tuple[str, str]:
    if len(fields) == 2:
        prompt, response = (batch[f][i] for f in fields)
        return "" if prompt is None else str(prompt), "" if response is None else str(response)
    turns = batch[fields[0]][i]
    turns = json.loads(turns) if isinstance(turns, str) else [dict(t) for t in turns]
    if not turns or any(not isinstance(t, Mapping) or "role" not in t or "content" not in t for t in turns) \
            or turns[-1]["role"] != "assistant":
        raise DataError(f"data.messages_field: column {fields[0]!r} row id {batch['id'][i]} must be a list of "
                        "{role, content} turns ending with the assistant's")
    turns = [{"role": str(t["role"]), "content": str(t["content"])} for t in turns]
    prompt = render_chat_prompt(tok, turns[:-1])
    if not getattr(tok, "chat_template", None):
        return prompt, turns[-1]["content"] + (tok.eos_token or "")
    whole = tok.apply_chat_template(turns, tokenize=False)
    if not whole.startswith(prompt):
        raise DataError(f"data.messages_field: the tokenizer's chat template does not render the prompt of row id "
                        f"{batch['id'][i]} as a prefix of the whole conversation; give prompt_field/response_field")
    return prompt, whole[len(prompt):]


def instruction_stats(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per block and split: rows, rows cut at max_length, rows left with no response token to learn."""
    taught = (np.asarray(batch["label"]) >= 0).any(1)
    splits = [s for s in SPLITS if (np.asarray(batch["split"]) == s).any()]
    masks = [np.asarray(batch["split"]) == s for s in splits]
    return {"split": np.array(splits, dtype=object).astype(str),
            "rows": np.array([m.sum() for m in masks], np.int64),
            "cut": np.array([(m & batch["cut"]).sum() for m in masks], np.int64),
            "untaught": np.array([(m & ~taught).sum() for m in masks], np.int64)}


def taught_rows(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Rows with at least one response token in the window (a prompt that fills it teaches nothing)."""
    taught = (np.asarray(batch["label"]) >= 0).any(1)
    return {k: np.asarray(v)[taught] for k, v in batch.items() if k != "cut"}


def feature_rows(batch: dict[str, np.ndarray], fields: tuple[str, ...], transform: Mapping[str, Any]) -> dict[str, np.ndarray]:
    x = np.stack([np.asarray(batch[f], dtype=np.float32) for f in fields], axis=1) if fields else \
        np.zeros((len(batch["id"]), 0), np.float32)
    return {"id": batch["id"], "x": apply_standardise(x, transform), "label": batch["label"], "split": batch["split"]}


def pil_image():
    return require("PIL.Image", "reading images (data.format=images, or data.image_field)")


def decode_image(value: Any, mode: str, size: int | None, base_dir: str | None = None) -> np.ndarray:
    """One image (array, encoded bytes, or a path) as float32 [C, H, W] in [0, 1]."""
    Image = pil_image()

    if isinstance(value, np.ndarray) and value.dtype != object:
        img = Image.fromarray(value.astype(np.uint8))
    else:
        if isinstance(value, (bytes, bytearray)):
            import io

            img = Image.open(io.BytesIO(value))
        else:
            path = Path(str(value))
            if not path.is_absolute() and base_dir:
                path = Path(base_dir) / path
            img = Image.open(path)
    img = img.convert(mode)
    if size is not None and img.size != (size, size):
        img = img.resize((size, size), Image.BILINEAR)
    arr = np.asarray(img, dtype=np.float32) / 255.0
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def image_rows(batch: dict[str, np.ndarray], column: str, mode: str, size: int | None, shape: tuple[int, ...],
            base_dir: str | None) -> dict[str, np.ndarray]:
    xs = []
    for value in batch[column]:
        x = decode_image(value, mode, size, base_dir)
        if x.shape != shape:
            raise DataError(f"an image has shape {x.shape[1:]} ({x.shape[0]} channels) but the first one had "
                            f"{shape[1:]}; set data.image_size to resize them all")
        xs.append(x)
    return {"id": batch["id"], "x": np.stack(xs) if xs else np.zeros((0, *shape), np.float32),
            "label": batch["label"], "split": batch["split"]}

