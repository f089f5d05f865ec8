"""How a conversation becomes the text a chat-trained language model continues from. Training
(``data.messages_field``) and Serve's ``/generate`` render with the same function, so a served student
sees its prompts exactly as it saw them in training. No Ray, no torch."""

from __future__ import annotations

from typing import Mapping, Sequence


def render_chat_prompt(tokenizer, turns: Sequence[Mapping[str, str]]) -> str:
    """The turns rendered with the tokenizer's chat template and its generation prompt; without a
    template, role-prefixed lines ending in ``assistant: `` (what training writes for such tokenizers)."""
    turns = [{"role": str(t["role"]), "content": str(t["content"])} for t in turns]
    if not getattr(tokenizer, "chat_template", None):
        return "".join(f"{t['role']}: {t['content']}\n" for t in turns) + "assistant: "
    return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
