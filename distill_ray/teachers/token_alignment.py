"""Teachers with another tokenizer: the student's ids as text, the two tokenizations aligned, the vocabularies mapped.

Pure functions on tokenizers and arrays, no Ray and no torch. A teacher whose vocabulary differs from
the student's reads the *student's* text re-tokenized its own way (as TRL's GOLD and NeMo-RL do):

1. ``decode_with_spans``: the student's ids back to text, with each token's character span. The text
   is what the student's ids say, so the student's spans in it are exact: lossless for byte-level BPE;
   for an uncased WordPiece student it is lowercased and its words are joined by single spaces.
2. ``content_starts`` / ``align_next_tokens``: a causal LM's position i predicts token i + 1, so a
   student position and a teacher position are aligned when their *next* tokens start at the same
   character (the first non-space character of the token: byte-level BPE's "Ġx" carries its space,
   WordPiece's "x" does not). Positions without a partner are masked out of the KD loss.
3. ``vocab_maps``: teacher id -> student id for the tokens both vocabularies share, used to carry the
   teacher's top-k onto student ids (``carry_topk``). "Shared" means: the two tokens add the same
   characters to the text at that position, and both either take the space before them or not. Each
   token is a key ``(body, takes_space)``: byte-level "Ġfind" is ("find", True), "find" ("find", False);
   WordPiece "##ind" is ("ind", False) and a word-initial "find" is ("find", True) after a space (always,
   in a WordPiece student's decoded text) and ("find", False) right after other text (a WordPiece
   teacher reading text with "(find"), hence two maps, picked per position by the character before
   the next token. Special tokens and byte pieces that are not whole characters share nothing. Case is
   kept: an uncased WordPiece student's vocabulary is lowercase, so only lowercase teacher tokens match.

Supported tokenizers: byte-level BPE (GPT-2, Llama 3, SmolLM2, ...) and WordPiece (BERT, MiniLM).
"""

from __future__ import annotations

import codecs
import functools
import json
from dataclasses import dataclass

import numpy as np


@functools.lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: the printable stand-in character of each byte -> the byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


def tokenizer_family(tok) -> str:
    """``byte_level`` or ``wordpiece``, read from a fast tokenizer's own description."""
    desc = json.loads(tok.backend_tokenizer.to_str())
    model, decoder = desc["model"]["type"], (desc.get("decoder") or {}).get("type")
    if model == "WordPiece":
        return "wordpiece"
    if model == "BPE" and decoder == "ByteLevel":
        return "byte_level"
    raise ValueError(f"cross-tokenizer distillation supports byte-level BPE and WordPiece tokenizers; "
                     f"{type(tok).__name__} is a {model} model with a {decoder} decoder")


@dataclass(frozen=True)
class TokenizerTables:
    """What alignment needs of one tokenizer, read once (a vocabulary-long pass): its family, per id the
    bytes the token writes (None: special), whether it is a WordPiece "##" piece, and its key."""

    family: str
    written: tuple
    continuation: np.ndarray
    keys: tuple
    special_ids: frozenset

    @property
    def vocab_size(self) -> int:
        return len(self.written)


def tables(tok) -> TokenizerTables:
    """``TokenizerTables`` of a fast transformers tokenizer (``len(tok)`` ids, added tokens included)."""
    family = tokenizer_family(tok)
    special = frozenset(tok.all_special_ids) | frozenset(getattr(tok, "added_tokens_decoder", {}) or {})
    pieces = tok.convert_ids_to_tokens(list(range(len(tok))))
    decoder = _byte_decoder()
    written: list[bytes | None] = []
    keys: list[tuple[str, bool | None] | None] = []
    for i, piece in enumerate(pieces):
        raw = None
        if i not in special and piece is not None:
            if family == "byte_level":
                raw = bytes(decoder[c] for c in piece) if all(c in decoder for c in piece) else None
            else:
                raw = (piece[2:] if piece.startswith("##") else piece).encode()
        written.append(raw)
        keys.append(_key(raw, piece, family, i in special))
    continuation = np.array([family == "wordpiece" and p is not None and p.startswith("##") for p in pieces])
    return TokenizerTables(family, tuple(written), continuation, tuple(keys), special)


def _key(raw: bytes | None, piece: str | None, family: str, special: bool):
    """``(body, takes_space)``: the characters a token adds and whether it also takes the one space
    before them; ``takes_space`` None for WordPiece word-initial tokens (decided by context). The body
    is text, or the raw bytes of a byte piece that is not a whole character (those match only the same
    piece). Special tokens are keyed by their own string, so only the same special token matches."""
    if special:
        return None if piece is None else (("special", piece), False)
    if raw is None:
        return None
    try:
        body: str | bytes = raw.decode("utf-8")
    except UnicodeDecodeError:
        body = raw
    if family == "wordpiece":
        return (body, False) if piece.startswith("##") else (body, None)
    if body[:1] in (" ", b" "):
        return body[1:], True
    return body, False


# Where a next token stands: 0 right after a non-word character or at the start, 1 after a space,
# 2 right after a word character. A WordPiece word token takes the space there (1), does not (0), and
# after a word character takes it unless it is punctuation (WordPiece would have glued a "##" piece).
CONTEXTS = 3


def _takes_space(body, ctx: int) -> bool:
    if ctx != 2:
        return ctx == 1
    first = body[:1]
    return isinstance(first, str) and first.isalnum()


def vocab_maps(teacher: TokenizerTables, student: TokenizerTables) -> np.ndarray:
    """``[CONTEXTS, V_teacher]`` int64 student ids (-1: not shared), one row per context of the next
    token (see ``CONTEXTS``; ``next_contexts`` picks it per position).

    A WordPiece word cannot tell "f(" from "f (", so a WordPiece *student's* word also stands for the
    other reading when no token of its own does (both the teacher's "(" and "Ġ(" name the student's
    "("; ``carry_topk`` adds them up). Where a word and a "##" piece read alike, the word wins after a
    non-word character and for punctuation, the piece after a word character."""
    maps = np.full((CONTEXTS, teacher.vocab_size), -1, np.int64)
    explicit = [(i, key) for i, key in enumerate(student.keys) if key is not None and key[1] is not None]
    words = [(i, key[0]) for i, key in enumerate(student.keys) if key is not None and key[1] is None]
    for ctx in range(CONTEXTS):
        read = [(i, (body, _takes_space(body, ctx))) for i, body in words]
        other = [(i, (body, not _takes_space(body, ctx))) for i, body in words]
        # Which reading wins where a word and a "##" piece read alike (MiniLM has "(" and "##("): the
        # word after a non-word character (no piece can follow one) and for punctuation (WordPiece
        # splits it off as a word of its own), else the piece.
        first = read if ctx == 0 else [r for r in read if not _takes_space(r[1][0], 2)] if ctx == 2 else []
        lookup: dict = {}
        for i, key in first + explicit + read + other:
            lookup.setdefault(key, i)
        for i, key in enumerate(teacher.keys):
            if key is not None:
                body, space = key
                maps[ctx, i] = lookup.get((body, _takes_space(body, ctx) if space is None else space), -1)
    return maps


def decode_with_spans(student: TokenizerTables, ids) -> tuple[str, np.ndarray]:
    """The text a student's ids say, and each token's ``[start, end)`` character span in it ([n, 2]).

    Byte-level BPE: the bytes the tokens write, exactly. WordPiece: words joined by one space, "##"
    pieces glued to the word before. Special tokens write nothing (an empty span, never aligned), and
    so does a byte piece that does not finish a character (the piece that finishes it spans it)."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    text: list[str] = []
    length = 0
    spans = np.zeros((len(ids), 2), np.int64)
    for n, i in enumerate(int(i) for i in ids):
        raw = student.written[i] if 0 <= i < student.vocab_size else None
        if raw is not None and student.family == "wordpiece" and length and not student.continuation[i]:
            raw = b" " + raw
        chars = decoder.decode(raw or b"")
        spans[n] = (length, length + len(chars))
        text.append(chars)
        length += len(chars)
    return "".join(text) + decoder.decode(b"", final=True), spans


def content_starts(text: str, spans) -> np.ndarray:
    """Per token the character where its content starts: the first non-space character of its span (a
    byte-level "Ġx" starts at x), the span's start if it is all whitespace, -1 for an empty span or a
    span starting where the token before started (byte pieces of one character)."""
    out = np.full(len(spans), -1, np.int64)
    last = -1
    for n, (start, end) in enumerate(np.asarray(spans).reshape(-1, 2).tolist()):
        if end <= start or start == last:
            continue
        c = start
        while c < end and text[c].isspace():
            c += 1
        out[n] = c if c < end else start
        last = start
    return out


def align_next_tokens(student_starts: np.ndarray, teacher_starts: np.ndarray) -> np.ndarray:
    """For each student position i (predicting student token i + 1), the teacher position j whose next
    token j + 1 starts at the same character, else -1 (the last position predicts past the text: -1)."""
    by_start = {int(c): j - 1 for j, c in enumerate(np.asarray(teacher_starts).tolist()) if c >= 0 and j > 0}
    out = np.full(len(student_starts), -1, np.int64)
    for i in range(len(student_starts) - 1):
        c = int(student_starts[i + 1])
        if c >= 0:
            out[i] = by_start.get(c, -1)
    return out


def next_contexts(text: str, starts: np.ndarray) -> np.ndarray:
    """The context (row of ``vocab_maps``) of a token starting at each of ``starts``: 1 after a space, 2
    right after a word character, 0 otherwise (other characters, the start, no start: -1)."""
    def ctx(c: int) -> int:
        if not 0 < c <= len(text):
            return 0
        before = text[c - 1]
        return 1 if before == " " else 2 if before.isalnum() else 0
    return np.array([ctx(c) for c in np.asarray(starts).tolist()], np.int64)


@dataclass(frozen=True)
class RowAlignment:
    """One student row read by the teacher: its ids for the teacher, and per student position the
    teacher position that predicts the same next token (-1: none) and which map applies there."""

    teacher_ids: list
    positions: np.ndarray
    context: np.ndarray

    @property
    def aligned(self) -> np.ndarray:
        return self.positions >= 0


def align_rows(student: TokenizerTables, teacher_tok, rows, next_ids=None,
               max_teacher_tokens: int | None = None) -> list[RowAlignment]:
    """Each student row ([L] ids) as text, tokenized by ``teacher_tok`` (a fast transformers tokenizer,
    no special tokens added), aligned position by position. ``next_ids`` [N] (the label of each row's
    last position, < 0 when there is none) is appended to the text, so the last position can align too;
    teacher tokens past ``max_teacher_tokens`` are cut (their positions stay unaligned)."""
    rows = np.asarray(rows)
    texts, student_starts = [], []
    for r, ids in enumerate(rows):
        ids = list(ids) + ([int(next_ids[r])] if next_ids is not None and next_ids[r] >= 0 else [])
        text, spans = decode_with_spans(student, ids)
        texts.append(text)
        student_starts.append(content_starts(text, spans)[:len(ids)])
    enc = teacher_tok(texts, add_special_tokens=False, return_offsets_mapping=True, return_attention_mask=False,
                      verbose=False)
    out = []
    for text, starts, ids, offsets in zip(texts, student_starts, enc["input_ids"], enc["offset_mapping"]):
        if max_teacher_tokens is not None:
            ids, offsets = ids[:max_teacher_tokens], offsets[:max_teacher_tokens]
        positions = align_next_tokens(starts, content_starts(text, offsets))[:rows.shape[1]]
        next_starts = np.append(starts[1:], -1)[:rows.shape[1]]
        out.append(RowAlignment(list(ids), positions, next_contexts(text, next_starts)))
    return out


def filler_pool(maps: np.ndarray, student_vocab: int, special_ids=(), k: int = 32) -> np.ndarray:
    """``2k`` student ids where ``carry_topk`` parks the slots of a top-k whose teacher tokens are not
    shared: first the ids no teacher token maps to (special ones first), which the teacher never
    speaks of, so giving them the tail's even share is exactly the top-k loss's own assumption about
    every class outside the k; then, if there are too few, the smallest reachable ids."""
    reachable = np.zeros(student_vocab, bool)
    reachable[maps[maps >= 0]] = True
    special = [i for i in sorted(special_ids) if 0 <= i < student_vocab and not reachable[i]]
    taken = frozenset(special)
    order = special + [i for i in np.flatnonzero(~reachable).tolist() if i not in taken] + \
        np.flatnonzero(reachable).tolist()
    return np.array(order[:2 * k], np.int64)


def carry_topk(logprobs: np.ndarray, teacher_ids: np.ndarray, maps: np.ndarray, context: np.ndarray,
               pool: np.ndarray, student_vocab: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A teacher's top-k ``[N, k]`` (log-probs, teacher ids) as a top-k over student ids.

    Shared tokens keep their log-probs (two teacher tokens naming one student token add up). The mass
    of tokens that are not shared is *dropped into the tail*, not renormalised over the shared ones:
    the top-k loss reads ``1 - sum(p)`` as "some other student token", which is what it is (the
    teacher's "):" is spelled by other student tokens), while renormalising would make the teacher
    sure of tokens it gave little mass. Freed slots take ids from ``pool`` (not reachable through the
    map) at the tail's even share, so the k indices stay distinct and the loss's tail assumption holds.
    ``context`` [N] picks the row of ``maps`` (``next_contexts`` of the next token).

    Returns ``(logprobs [N, k] float32 descending, student ids [N, k] int64, shared mass [N])``.
    """
    logprobs = np.asarray(logprobs, np.float64)
    n, k = logprobs.shape
    ids = maps[np.asarray(context, np.int64)[:, None], np.asarray(teacher_ids, np.int64)]  # [N, k], -1 unmapped
    # Duplicates (a WordPiece teacher's "x" and "##x" glued to a word): the first slot takes the sum.
    same = (ids[:, :, None] == ids[:, None, :]) & (ids[:, :, None] >= 0)
    first = np.argmax(same, axis=2)
    merged = np.zeros((n, k))
    np.add.at(merged, (np.repeat(np.arange(n)[:, None], k, 1), first), np.where(ids >= 0, np.exp(logprobs), 0.0))
    first_slot = (ids >= 0) & (first == np.arange(k)[None, :])
    alone = same.sum(2) == 1  # nothing merged into it: keep the teacher's own number, bit for bit
    shared = np.where(first_slot, merged, 0.0).sum(1)
    free = k - first_slot.sum(1)
    share = np.log(np.clip(1.0 - shared, 1e-12, None) / np.maximum(student_vocab - (k - free), 1))
    out_logp = np.where(first_slot, np.where(alone, logprobs, np.log(np.where(first_slot, merged, 1.0))), share[:, None])
    out_ids = np.where(first_slot, ids, -1)
    for r in np.flatnonzero(free):  # free slots: pool ids not already kept in this row, in pool order
        fill = pool[~np.isin(pool, out_ids[r])][:free[r]]
        if len(fill) < free[r]:
            raise ValueError(f"the filler pool ({len(pool)} ids) is too small for top-{k}")
        out_ids[r, ~first_slot[r]] = fill
    order = np.argsort(-out_logp, axis=1, kind="stable")
    return (np.take_along_axis(out_logp, order, 1).astype(np.float32), np.take_along_axis(out_ids, order, 1),
            shared)
