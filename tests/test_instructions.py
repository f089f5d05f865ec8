"""Instruction data for causal LMs: prompt/response pairs and chat turns, the loss on response tokens
only, the standard library's "write this function" pairs."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from distill_ray.config import ConfigError, apply_overrides, config_from_dict
from distill_ray.data.bundled import function_pairs, resolve_tokenizer
from distill_ray.data.preprocess import instruction_rows
from distill_ray.data.rows import IGNORE_LABEL

REPO = Path(__file__).resolve().parents[1]

SOURCE = '''
import os

def plain(a, b):
    return a + b

def documented(a,
               b=2):
    """Add them.

    Longer text.
    """
    total = a + b
    return total

class Box:
    def put(self, item):
        """Keep the item."""
        self.items.append(item)

    def only_doc(self):
        """Nothing after me."""
'''


def test_function_pairs_split_each_documented_function_at_the_end_of_its_docstring():
    pairs = {name: (prompt, response) for name, prompt, response in function_pairs(SOURCE)}
    # No docstring (plain) or nothing after it (only_doc): no pair.
    assert sorted(pairs) == ["Box.put", "documented"]
    prompt, response = pairs["documented"]
    assert prompt.startswith("def documented(a,\n               b=2):\n") and prompt.endswith('    """\n')
    assert response == "    total = a + b\n    return total\n"
    prompt, response = pairs["Box.put"]  # a method, dedented to its def so it parses on its own
    assert prompt == 'def put(self, item):\n    """Keep the item."""\n'
    assert response == "    self.items.append(item)\n"
    for prompt, response in pairs.values():
        ast.parse(prompt + response)
    assert function_pairs("def broken(:\n") == []


def _tokenizer_dir(tmp_path: Path, chat_template: str | None = None) -> str:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_tokenizer("minilm"), local_files_only=True)
    tok.eos_token = "[SEP]"
    if chat_template:
        tok.chat_template = chat_template
    out = tmp_path / ("chat_tok" if chat_template else "tok")
    tok.save_pretrained(out)
    return str(out)


def _ids(tokenizer_dir: str, text: str) -> list[int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)(text, add_special_tokens=False)["input_ids"]


def test_response_tokens_are_the_only_labels_and_long_pairs_are_cut(tmp_path):
    tok_dir = _tokenizer_dir(tmp_path)
    prompts, responses = ["def add(a, b):", "def sub(a, b): " + "long " * 40], ["return a + b", "return a - b"]
    batch = {"id": np.array([1, 2]), "split": np.array(["train", "train"], dtype=object),
             "prompt": np.array(prompts, dtype=object), "response": np.array(responses, dtype=object)}
    out = instruction_rows(batch, ("prompt", "response"), tok_dir, max_length=24, pad_id=0)
    p, r = _ids(tok_dir, prompts[0]), _ids(tok_dir, responses[0]) + [_ids(tok_dir, "[SEP]")[0]]
    x, y = out["x"][0], out["label"][0]
    assert x[:len(p) + len(r) - 1].tolist() == (p + r)[:-1] and (x[len(p) + len(r) - 1:] == 0).all()
    # Position j predicts token j + 1: the labels are exactly the response (and its end), nothing else.
    assert (y[:len(p) - 1] == IGNORE_LABEL).all() and y[len(p) - 1:len(p) - 1 + len(r)].tolist() == r
    assert (y[len(p) - 1 + len(r):] == IGNORE_LABEL).all()
    # The second prompt fills the window by itself: cut, and nothing left to learn.
    assert out["cut"].tolist() == [False, True] and (out["label"][1] == IGNORE_LABEL).all()


def test_chat_turns_render_with_the_template_and_only_the_last_answer_is_learned(tmp_path):
    template = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} [SEP] {% endfor %}"
                "{% if add_generation_prompt %}<assistant> {% endif %}")
    tok_dir = _tokenizer_dir(tmp_path, template)
    turns = [{"role": "user", "content": "name a colour"}, {"role": "assistant", "content": "red"},
             {"role": "user", "content": "another"}, {"role": "assistant", "content": "blue"}]
    batch = {"id": np.array([7]), "split": np.array(["val"], dtype=object),
             "messages": np.array([json.dumps(turns)], dtype=object)}
    out = instruction_rows(batch, ("messages",), tok_dir, max_length=48, pad_id=0)
    learned = [t for t in out["label"][0].tolist() if t != IGNORE_LABEL]
    assert learned == _ids(tok_dir, "blue [SEP] ")  # the earlier answer ("red") is prompt
    bad = {**batch, "messages": np.array([json.dumps(turns[:1])], dtype=object)}
    with pytest.raises(Exception, match="messages_field.*ending with the assistant"):
        instruction_rows(bad, ("messages",), tok_dir, max_length=48, pad_id=0)


def test_prompt_tokens_contribute_nothing_to_the_loss():
    """Task and KD terms of a causal-LM step: the student's logits at prompt positions get no gradient,
    whatever the teachers say there."""
    from distill_ray.kd.blending import TeacherBlend
    from distill_ray.kd.losses import teacher_topk
    from distill_ray.kd.objectives import TokenTopK, task_loss, token_kd_loss

    torch.manual_seed(0)
    V, B, L, prompt_len = 40, 3, 10, 4
    labels = torch.randint(0, V, (B, L))
    labels[:, :prompt_len] = IGNORE_LABEL
    labels[1, -2:] = IGNORE_LABEL  # padding
    cfg = config_from_dict(apply_overrides(_tiny_lm_raw(), [("loss.topk", 8)]))
    student = torch.randn(B, L, V, requires_grad=True)
    teachers = torch.randn(2, B, L, V)
    kd = token_kd_loss(cfg, TeacherBlend("uniform", 2), student, TokenTopK(*teacher_topk(teachers, 8)), labels, 1.0)
    loss = 0.7 * kd + 0.3 * task_loss(student, labels, None, None, 0.0, causal=True)
    (grad,) = torch.autograd.grad(loss, student)
    ignored = labels < 0
    assert grad[ignored].abs().max() == 0 and grad[~ignored].abs().sum(-1).min() > 0
    # Other teacher outputs at the ignored positions leave the loss as it was.
    teachers[:, ignored] = torch.randn_like(teachers[:, ignored]) * 5
    kd2 = token_kd_loss(cfg, TeacherBlend("uniform", 2), student, TokenTopK(*teacher_topk(teachers, 8)), labels, 1.0)
    assert kd2.item() == pytest.approx(kd.item(), rel=1e-6)


def _tiny_lm_raw() -> dict:
    import yaml

    return yaml.safe_load((REPO / "jobs/configs/tiny_lm.yaml").read_text())


def test_instruction_keys_are_checked_together():
    raw = {**_tiny_lm_raw(), "data": {"format": "jsonl", "path": "x.jsonl", "task": "causal_lm",
                                      "prompt_field": "q"}}
    with pytest.raises(ConfigError, match="data.response_field.*required with data.prompt_field"):
        config_from_dict(raw)
    raw["data"].update(response_field="a", messages_field="m")
    with pytest.raises(ConfigError, match="data.messages_field.*not both"):
        config_from_dict(raw)
    raw["data"] = {"format": "fortunes", "task": "causal_lm", "messages_field": "m"}
    with pytest.raises(ConfigError, match="needs a table"):
        config_from_dict(raw)


@pytest.mark.ray
def test_jsonl_instruction_data_through_the_spine(ray_local, tmp_path):
    """Pairs from a JSONL file: split by id, prompt masked, long pairs counted as cut, rows whose prompt
    fills the window dropped; a missing column is named with the file."""
    from distill_ray.data.rows import DataError
    from distill_ray.data.sources import load_source

    rows = [{"q": f"def f{i}(x):" + (" pad" * 60 if i % 10 == 0 else ""), "a": f"return x * {i}" + " + 1" * (i % 7)}
            for i in range(200)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    raw = {**_tiny_lm_raw(), "data": {"format": "jsonl", "path": str(path), "task": "causal_lm", "tokenizer": "minilm",
                                      "prompt_field": "q", "response_field": "a", "max_length": 40,
                                      "val_fraction": 0.2, "test_fraction": 0.2}}
    src = load_source(config_from_dict(raw))
    info = src.info
    assert sum(info.counts.values()) == 180  # the 20 prompts padded with " pad" * 60 teach nothing
    assert sum(info.truncated.values()) == 20 and info.num_classes == 30522
    train = src.splits["train"].to_pandas()
    assert len(train) == info.counts["train"] and 80 < len(train) < 140
    labels = np.stack(train["label"].to_numpy())
    inputs = np.stack(train["x"].to_numpy())
    assert (labels[:, 0] == IGNORE_LABEL).all()  # "def" never predicts a response token
    assert ((labels >= 0).sum(1) >= 4).all()  # "return x * i" and its end
    assert ((labels >= 0) <= (inputs != 0)).all()  # labels only at real tokens, never at padding
    raw["data"]["response_field"] = "answer"
    with pytest.raises(DataError, match=r"data.response_field: column 'answer' is not in .*pairs.jsonl"):
        load_source(config_from_dict(raw))


def test_rouge_l_and_the_parse_check_on_known_cases():
    from distill_ray.lm.generation import lcs_length, parses, prompts_and_references, rouge_l

    assert lcs_length(list("ABCBDAB"), list("BDCABA")) == 4  # the textbook pair
    assert rouge_l("return a + b", "return a + b") == 1.0 and rouge_l("x", "y") == 0.0
    # LCS "the cat the mat"... of 6 and 5 words: 3 common in order -> P 3/6, R 3/5
    assert rouge_l("the cat sat on the mat", "the dog on the rug") == pytest.approx(2 * 0.5 * 0.6 / 1.1)
    assert parses('def f(a):\n    """Doc."""\n', "    return a\n")
    assert not parses('def f(a):\n    """Doc."""\n', "    return (a\n")
    x = np.array([[5, 6, 7, 8, 0], [5, 6, 0, 0, 0]])
    y = np.array([[-100, 7, 8, 9, -100], [-100] * 5])
    assert prompts_and_references(x, y) == [([5, 6], [7, 8, 9])]  # the unlabeled row is skipped
