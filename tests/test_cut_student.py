"""Students cut from a teacher (lm/cut.py): the kept layers carry the teacher's weights exactly."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from distill_ray.lm.cut import cut_causal_lm, kept_layers, write_cut_student


def _llama(layers: int = 4, tie: bool = True):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                         tie_word_embeddings=tie, pad_token_id=0)
    return LlamaForCausalLM(config).eval()


def _gpt2(layers: int = 3):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(1)
    return GPT2LMHeadModel(GPT2Config(vocab_size=97, n_embd=16, n_layer=layers, n_head=2, n_positions=64)).eval()


IDS = torch.randint(1, 97, (3, 11), generator=torch.Generator().manual_seed(2))


def test_kept_layers_takes_every_nth_and_always_the_last():
    assert kept_layers(30, keep_every=3) == [0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 29]
    assert kept_layers(4, keep_every=1) == [0, 1, 2, 3]
    assert kept_layers(6, layers=[5, 0, 2, 2]) == [0, 2, 5]
    for bad in ({"layers": [0, 6]}, {"layers": [-1]}, {"layers": []}, {"keep_every": 0}, {},
                {"layers": [0], "keep_every": 2}):
        with pytest.raises(ValueError):
            kept_layers(6, **bad)


@pytest.mark.parametrize("tie", [True, False])
def test_a_llama_cut_equals_the_teacher_with_its_other_layers_removed(tie):
    teacher = _llama(tie=tie)
    student = cut_causal_lm(teacher, [0, 2, 3])
    assert student.config.num_hidden_layers == 3 and len(student.model.layers) == 3
    # The same model built by module surgery on a copy of the teacher.
    reference = copy.deepcopy(teacher)
    reference.model.layers = nn.ModuleList([reference.model.layers[i] for i in (0, 2, 3)])
    reference.config.num_hidden_layers = 3
    with torch.no_grad():
        got = student(input_ids=IDS, use_cache=False).logits
        want = reference(input_ids=IDS, use_cache=False).logits
        full = teacher(input_ids=IDS, use_cache=False).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert not torch.allclose(got, full, atol=1e-3)  # a layer really went
    assert torch.equal(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight)
    assert torch.equal(student.lm_head.weight, teacher.lm_head.weight)
    assert torch.equal(student.model.layers[1].mlp.up_proj.weight, teacher.model.layers[2].mlp.up_proj.weight)
    assert (student.lm_head.weight.data_ptr() == student.model.embed_tokens.weight.data_ptr()) == tie


def test_cutting_nothing_gives_the_teacher_back_for_gpt2_too():
    for teacher in (_llama(), _gpt2()):
        student = cut_causal_lm(teacher, list(range(teacher.config.num_hidden_layers)))
        with torch.no_grad():
            torch.testing.assert_close(student(input_ids=IDS).logits, teacher(input_ids=IDS).logits, rtol=0, atol=1e-6)


def test_the_cut_student_is_a_plain_hf_directory_that_generates(tmp_path):
    from distill_ray.models import load_model, num_params

    teacher = _llama(layers=6)
    teacher.save_pretrained(tmp_path / "teacher")
    facts = write_cut_student(tmp_path / "teacher", tmp_path / "student", keep_every=2)
    assert facts["layers"] == [0, 2, 4, 5] and facts["teacher_layers"] == 6
    assert facts["teacher_params"] == num_params(teacher) > facts["params"]
    student, spec = load_model(tmp_path / "student")
    assert spec["task"] == "causal_lm" and student.config.num_hidden_layers == 4
    assert num_params(student) == facts["params"]
    out = student.generate(IDS[:1, :4], max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 9)


@pytest.mark.parametrize("overrides, key, words", [
    ([("student.init.teacher", "llama"), ("student.init.keep_every", 2)], "student.init.teacher", "llama_wide, llama_deep"),
    ([("student.init.teacher", "llama_deep")], "student.init", "exactly one of layers"),
    ([("student.init.teacher", "llama_deep"), ("student.init.layers", [0]), ("student.init.keep_every", 2)],
     "student.init", "exactly one of layers"),
    ([("student.init.keep_every", 2)], "student.init.teacher", "names the teacher"),
    ([("student.init.teacher", "llama_deep"), ("student.init.keep_every", 0)], "student.init.keep_every", ">= 1"),
    ([("student.init.teacher", "llama_deep"), ("student.init.keep_every", 2), ("teachers.llama_deep.tokenizer", "smollm2")],
     "student.init.teacher", "another tokenizer"),
    ([("student.arch", "hf_dir")], "student.path", "is required"),
])
def test_a_bad_student_init_names_the_key_and_the_reason(overrides, key, words):
    import yaml

    from distill_ray.config import ConfigError, apply_overrides, config_from_dict

    raw = yaml.safe_load(open("jobs/configs/tiny_lm.yaml"))
    with pytest.raises(ConfigError) as err:
        config_from_dict(apply_overrides(raw, overrides))
    assert str(err.value).startswith(key + ":") and words in str(err.value), str(err.value)


def test_a_classifier_cannot_be_cut_and_a_cut_config_points_at_its_directory(tmp_path):
    import yaml

    from distill_ray.config import ConfigError, apply_overrides, config_from_dict
    from distill_ray.lm.cut import student_from_teacher

    raw = yaml.safe_load(open("jobs/configs/tiny.yaml"))
    with pytest.raises(ConfigError, match="student.init.teacher: .*causal_lm"):
        config_from_dict(apply_overrides(raw, [("student.init.teacher", "mlp_a"), ("student.init.keep_every", 2)]))
    lm = yaml.safe_load(open("jobs/configs/tiny_lm.yaml"))
    cfg = config_from_dict(apply_overrides(lm, [("student.init.teacher", "llama_deep"), ("student.init.layers", [1])]))
    _llama(layers=3).save_pretrained(tmp_path / "deep")
    cut_cfg, facts = student_from_teacher(cfg, {"llama_deep": tmp_path / "deep"}, tmp_path / "cut")
    assert (cut_cfg.student.arch, cut_cfg.student.path) == ("hf_dir", str((tmp_path / "cut").resolve()))
    assert facts["teacher"] == "llama_deep" and facts["layers"] == [1]
    assert student_from_teacher(config_from_dict(lm), {}, tmp_path / "none") == (config_from_dict(lm), None)
