"""Query-like alignment text: pseudo-queries the LM writes for corpus passages (doc2query), one per passage.

The head must learn the teacher's geometry for queries, which corpus sentences alone do not teach. SmolLM2-135M
does not follow a zero-shot instruction here (it apologises, or repeats the instruction); two worked examples in
the chat make it write in-domain questions (DSTC11) or claims (SciFact) (training/EXPERIMENTS.md, session 16).
`retrieval-head pseudo-queries` writes them to a text file, which `data.text_files` adds to the alignment text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class PseudoQueryPrompt:
    """The instruction after each passage, and worked (passage, query) examples before it."""

    instruction: str
    examples: tuple[tuple[str, str], ...]

    def messages(self, text: str) -> list[dict[str, str]]:
        chat = []
        for passage, query in self.examples:
            chat += [{"role": "user", "content": f"Text: {passage}\n\n{self.instruction}"},
                     {"role": "assistant", "content": query}]
        return [*chat, {"role": "user", "content": f"Text: {text}\n\n{self.instruction}"}]


STYLES = {
    "question": PseudoQueryPrompt("Write a question this text answers.", (
        ("The Lensfield Hotel has free parking for guests.", "Does the Lensfield Hotel have free parking?"),
        ("Pizza Hut City Centre opens at 11am and serves until midnight.",
         "What time does Pizza Hut City Centre open?"),
    )),
    "claim": PseudoQueryPrompt("Write a claim this text supports.", (
        ("Vitamin D supplementation reduced hip fractures in adults over 65 in a randomized trial.",
         "Vitamin D lowers fracture risk in the elderly."),
        ("Mice lacking the p53 gene developed tumours within six months.",
         "Loss of p53 causes early tumour formation in mice."),
    )),
}
"""Prompts by the kind of query a dataset asks: questions (dialogues, QA) or claims (fact checking)."""


def usable(text: str, min_words: int = 3, max_words: int = 40) -> str:
    """The first line of what the LM wrote, unquoted, or "" when it is not a query's length."""
    lines = text.strip().splitlines()
    line = lines[0].strip().strip('"').strip() if lines else ""
    return line if min_words <= len(line.split()) <= max_words else ""


def write_pseudo_queries(model: Any, tokenizer: Any, texts: Sequence[str], prompt: PseudoQueryPrompt | None = None,
                         batch_size: int = 16, max_new_tokens: int = 32, max_chars: int = 300,
                         show_progress_bar: bool = False) -> list[str]:
    """One pseudo-query per text (each cut to `max_chars`), greedy; "" where the LM wrote nothing of a query's
    length. `prompt` defaults to `STYLES["question"]`."""
    replies = generate_replies(model, tokenizer, texts, prompt or STYLES["question"], batch_size, max_new_tokens,
                               max_chars, show_progress_bar)
    return [usable(reply) for reply in replies]


def generate_replies(model: Any, tokenizer: Any, texts: Sequence[str], prompt: PseudoQueryPrompt, batch_size: int = 16,
                     max_new_tokens: int = 32, max_chars: int = 300, show_progress_bar: bool = False) -> list[str]:
    """What the LM writes after `prompt` for each text, in left-padded batches (the eos token pads a tokenizer
    without a pad token); the tokenizer's padding settings are restored."""
    from tqdm.auto import tqdm

    side, pad = tokenizer.padding_side, tokenizer.pad_token
    tokenizer.padding_side = "left"
    if pad is None:
        tokenizer.pad_token = tokenizer.eos_token
    replies: list[str] = []
    try:
        for i in tqdm(range(0, len(texts), batch_size), desc="Pseudo-queries", disable=not show_progress_bar):
            prompts = [tokenizer.apply_chat_template(prompt.messages(t[:max_chars]), tokenize=False,
                                                     add_generation_prompt=True) for t in texts[i : i + batch_size]]
            batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
            with torch.inference_mode():
                out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id)
            replies += tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
        if pad is None:
            tokenizer.pad_token = None
    return replies
