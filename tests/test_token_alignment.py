"""Teachers with another tokenizer, the pure parts: text and spans from ids, position alignment, the
vocabulary map, carrying a top-k across, and the ULD loss. Real tokenizers (MiniLM's uncased WordPiece,
SmolLM2's byte-level BPE) on real text (the standard library's docstrings); no Ray."""

from __future__ import annotations

import json
import string
import textwrap

import numpy as np
import pytest
import torch

from distill_ray.kd.losses import teacher_topk, topk_kd_divergence, uld_divergence
from distill_ray.teachers.token_alignment import (align_next_tokens, align_rows, carry_topk, content_starts,
                                         decode_with_spans, filler_pool, tables, vocab_maps)

# Real text with capitals, punctuation, indentation and code: docstrings of the standard library.
DOCS = [textwrap.dedent(f.__doc__).strip() for f in (json.dumps, textwrap.dedent, string.capwords)]


def _tokenizer(name: str):
    from distill_ray.data.bundled import DataUnavailable, load_tokenizer

    try:
        return load_tokenizer(name)
    except (DataUnavailable, OSError) as err:
        pytest.skip(f"{name} tokenizer unavailable: {err}")


@pytest.fixture(scope="module")
def minilm():
    tok = _tokenizer("minilm")
    return tok, tables(tok)


@pytest.fixture(scope="module")
def smollm2():
    tok = _tokenizer("smollm2")
    return tok, tables(tok)


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("which", ["minilm", "smollm2"])
def test_same_tokenizer_reads_the_decoded_text_back_to_the_same_ids_and_aligns_as_the_identity(which, request):
    tok, tab = request.getfixturevalue(which)
    for doc in DOCS:
        ids = _ids(tok, doc)
        text, spans = decode_with_spans(tab, ids)
        if which == "smollm2":
            assert text == doc  # byte-level BPE decodes losslessly
        (row,) = align_rows(tab, tok, np.array([ids]))
        assert row.teacher_ids == ids
        # Every position but the last (its next token is past the text) aligns with itself.
        assert row.positions[:-1].tolist() == list(range(len(ids) - 1)) and row.positions[-1] == -1
        maps = vocab_maps(tab, tab)
        assert (maps[row.context[:-1], np.array(ids[1:])] == np.array(ids[1:])).all()


@pytest.mark.parametrize("which", ["minilm", "smollm2"])
def test_same_tokenizer_vocab_map_is_the_identity_where_a_token_can_stand(which, request):
    tok, tab = request.getfixturevalue(which)
    maps = vocab_maps(tab, tab)
    every = np.arange(tab.vocab_size)  # special tokens too: the same special token is shared
    if which == "smollm2":  # byte-level BPE tokens are context-free: every map is the identity
        assert (maps == every).all()
    else:  # after a space or a word character every token is itself; after other characters (where a
        # "##" piece cannot stand) a piece names the word that reads alike
        words = every[~tab.continuation]
        alnum_pieces = np.array([i for i in every[tab.continuation] if tab.keys[i][0][:1].isalnum()])
        assert (maps[1] == every).all() and (maps[2, words] == words).all()
        assert (maps[2, alnum_pieces] == alnum_pieces).all() and (maps[0, words] == words).all()
        # MiniLM also has "##(": WordPiece splits punctuation off as a word, so the word "(" is named
        assert maps[2, tok.convert_tokens_to_ids("##(")] == tok.convert_tokens_to_ids("(")
        piece = tok.convert_tokens_to_ids("##s")
        assert maps[0, piece] == tok.convert_tokens_to_ids("s")


def test_the_cross_tokenizer_loss_equals_the_same_tokenizer_loss_when_both_tokenizers_are_the_same(smollm2, minilm):
    """Alignment + map + carry on one tokenizer give the student the teacher's own top-k, bit for bit."""
    for tok, tab in (smollm2, minilm):
        torch.manual_seed(0)
        rows = [_ids(tok, doc)[:40] for doc in DOCS]
        n = min(len(r) for r in rows)
        rows = np.array([r[:n] for r in rows])
        vocab = tab.vocab_size
        teacher_logits = torch.randn(len(rows), n, vocab) * 3
        student_logits = torch.randn(len(rows), n, vocab, requires_grad=True)
        k = 16
        logp, idx = teacher_topk(teacher_logits, k)
        maps, pool = vocab_maps(tab, tab), filler_pool(vocab_maps(tab, tab), vocab, tab.special_ids, k)
        carried_logp, carried_idx, mask = np.zeros((len(rows), n, k), np.float32), np.zeros((len(rows), n, k), np.int64), \
            np.zeros((len(rows), n), bool)
        for r, row in enumerate(align_rows(tab, tok, rows)):
            at = np.maximum(row.positions, 0)
            lp, ids, shared = carry_topk(logp[r, at].numpy(), idx[r, at].numpy(), maps, row.context, pool, vocab)
            carried_logp[r], carried_idx[r], mask[r] = lp, ids, row.aligned
            assert np.allclose(shared[row.aligned], np.exp(logp[r, at].numpy().astype(np.float64)).sum(1)[row.aligned])
        assert np.array_equal(carried_idx[mask], idx.numpy()[mask]) and np.array_equal(carried_logp[mask], logp.numpy()[mask])
        for kind, temperature in (("forward_kl", 1.0), ("reverse_kl", 2.0), ("js", 1.5)):
            same = topk_kd_divergence(student_logits, logp, idx, kind, temperature, torch.as_tensor(mask))
            cross = topk_kd_divergence(student_logits, torch.as_tensor(carried_logp), torch.as_tensor(carried_idx), kind,
                                       temperature, torch.as_tensor(mask))
            assert cross.item() == same.item() and same.item() > 0
        assert mask.sum() == len(rows) * (n - 1)  # all but the last position of each row


def test_known_alignment_of_a_python_line_between_smollm2_and_wordpiece(smollm2, minilm):
    """Student SmolLM2 (BPE, reads the text as written), teacher MiniLM's WordPiece, hand-checked."""
    (stok, stab), (ttok, ttab) = smollm2, minilm
    ids = _ids(stok, "def find(self, sub):")
    assert stok.convert_ids_to_tokens(ids) == ["def", "Ġfind", "(", "self", ",", "Ġsub", "):"]
    (row,) = align_rows(stab, ttok, np.array([ids]))
    assert ttok.convert_ids_to_tokens(row.teacher_ids) == ["def", "find", "(", "self", ",", "sub", ")", ":"]
    # Student position i predicts token i + 1; "):" starts where the teacher's ")" does: aligned too.
    assert row.positions.tolist() == [0, 1, 2, 3, 4, 5, -1]
    # after a space (1: "find", "sub"), a word character (2: "(", ",", "):"), other (0: "self")
    assert row.context.tolist() == [1, 2, 0, 2, 1, 2, 0]
    maps = vocab_maps(ttab, stab)
    teacher_next = np.array(row.teacher_ids[1:7])
    got = stok.convert_ids_to_tokens(maps[row.context[:6], teacher_next].tolist())
    # The teacher's ")" is the student's ")" (not its "):", which falls in the tail).
    assert got == ["Ġfind", "(", "self", ",", "Ġsub", ")"]


def test_known_alignment_of_a_docstring_line_from_wordpiece_to_smollm2(smollm2, minilm):
    """Student MiniLM (uncased WordPiece): the teacher reads the student's text, lowercased and spaced."""
    (stok, stab), (ttok, ttab) = minilm, smollm2
    ids = _ids(stok, "Return the Tokenizers' list.")
    assert stok.convert_ids_to_tokens(ids) == ["return", "the", "token", "##izer", "##s", "'", "list", "."]
    text, spans = decode_with_spans(stab, ids)
    assert text == "return the tokenizers ' list ."
    assert content_starts(text, spans).tolist() == [0, 7, 11, 16, 20, 22, 24, 29]
    (row,) = align_rows(stab, ttok, np.array([ids]))
    teacher = ttok.convert_ids_to_tokens(row.teacher_ids)
    assert teacher == ["return", "Ġthe", "Ġtoken", "izers", "Ġ'", "Ġlist", "Ġ."]
    # "##izer" and "##s" have no teacher token starting at their characters ("izers" starts at 16 but
    # spans both): the position before "##s" is unaligned; "##izer" is predicted where "izers" is.
    assert row.positions.tolist() == [0, 1, 2, -1, 3, 4, 5, -1]
    assert row.context.tolist() == [1, 1, 2, 2, 1, 1, 1, 0]
    maps = vocab_maps(ttab, stab)
    mapped = [int(maps[row.context[i], row.teacher_ids[j + 1]]) for i, j in enumerate(row.positions) if j >= 0]
    # "izers" is no WordPiece token (its "##izer" "##s" are two): not shared, its mass goes to the tail
    assert [stok.convert_ids_to_tokens(i) if i >= 0 else None for i in mapped] == \
        ["the", "token", None, "'", "list", "."]
    # Only lowercase teacher tokens reach an uncased student: "ĠThe" has no student id.
    assert maps[1, ttok.convert_tokens_to_ids("ĠThe")] == -1 and maps[1, ttok.convert_tokens_to_ids("Ġthe")] >= 0


def test_real_pair_aligns_most_positions_and_maps_most_teacher_top1_mass(smollm2, minilm):
    (stok, stab), (ttok, _) = minilm, smollm2
    rows = [_ids(stok, doc)[:96] for doc in DOCS]
    n = min(map(len, rows))
    aligned = [row.aligned[:-1].mean() for row in align_rows(stab, ttok, np.array([r[:n] for r in rows]))]
    assert min(aligned) > 0.8, aligned


def test_align_next_tokens_on_toy_starts():
    # student next tokens start at 3, 5, 9; the teacher's at 3, 9 (it has one token over 5..9)
    assert align_next_tokens(np.array([0, 3, 5, 9]), np.array([0, 3, 9])).tolist() == [0, -1, 1, -1]
    assert align_next_tokens(np.array([0, -1, 5]), np.array([0, 5])).tolist() == [-1, 0, -1]


def test_carry_topk_merges_duplicates_drops_unshared_mass_into_the_tail_and_fills_distinct_ids():
    maps = np.array([[10, 10, -1, 11, 12], [10, 13, -1, 11, 12]])  # teacher 0 and 1 both -> 10 in context 0
    logp = np.log(np.array([[0.4, 0.3, 0.2, 0.05]]))
    teacher = np.array([[0, 1, 2, 3]])
    out_logp, out_ids, shared = carry_topk(logp, teacher, maps, np.array([0]), np.array([0, 1, 2]), 20)
    p = np.exp(out_logp[0].astype(np.float64))
    assert out_ids[0].tolist()[:2] == [10, 11] and p[:2] == pytest.approx([0.7, 0.05])
    assert shared[0] == pytest.approx(0.75)
    # Two freed slots (teacher 1 merged, teacher 2 unshared): pool ids at the tail's even share.
    assert sorted(out_ids[0, 2:].tolist()) == [0, 1] and p[2:] == pytest.approx([0.25 / 18] * 2)
    assert len(set(out_ids[0].tolist())) == 4 and np.all(np.diff(out_logp[0]) <= 0)


# --- the ULD loss ------------------------------------------------------------------------------------

def test_uld_is_zero_for_identical_distributions_and_grows_as_they_part():
    torch.manual_seed(0)
    teacher = torch.randn(2, 5, 50) * 2
    full = torch.log_softmax(teacher, -1).sort(-1, descending=True).values
    # identical, also when the vocabularies are permuted (ULD ignores which token is which)
    assert uld_divergence(teacher[..., torch.randperm(50)], full, 2.0).item() == pytest.approx(0.0, abs=1e-6)
    logp, _ = teacher_topk(teacher, 8)  # top-k with its tail, exact at T = 1
    assert uld_divergence(teacher, logp, 1.0, teacher_vocab=50).item() == pytest.approx(0.0, abs=1e-6)
    losses = [uld_divergence(teacher + s * torch.randn(2, 5, 50), logp, 1.0, teacher_vocab=50).item()
              for s in (0.5, 2.0, 8.0)]
    assert 0 < losses[0] < losses[1] < losses[2]
    flat = uld_divergence(torch.zeros(2, 5, 50), logp, 1.0, teacher_vocab=50)  # uniform student
    assert flat.item() > losses[0]


def test_uld_masks_positions_pads_the_shorter_side_and_reaches_only_the_student():
    torch.manual_seed(1)
    student = torch.randn(2, 4, 6, requires_grad=True)
    teacher = torch.log_softmax(torch.randn(2, 4, 30), -1).sort(-1, descending=True).values[..., :10]
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]])
    per = uld_divergence(student, teacher, 1.0, mask, teacher_vocab=30, reduction="none")
    loss = uld_divergence(student, teacher, 1.0, mask, teacher_vocab=30)
    assert per[mask == 0].abs().max() == 0 and loss.item() == pytest.approx(per[mask == 1].mean().item())
    # 6 student probabilities against 10 teacher ones: the student's are padded with zeros
    p_t, p_s = teacher[0, 0].exp(), torch.softmax(student[0, 0], -1).sort(descending=True).values
    assert per[0, 0].item() == pytest.approx(((p_t[:6] - p_s).abs().sum() + p_t[6:].sum()).item(), rel=1e-5)
    loss.backward()
    assert student.grad[:, 2:].abs().max() == 0 and student.grad[0, :2].abs().sum() > 0
    assert uld_divergence(student, teacher, 1.0, torch.zeros(2, 4)).item() == 0.0
