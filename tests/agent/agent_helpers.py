"""Shared by the agent tests: a tiny LM + head, a random index, a scripted LM, the one-forward rerun."""

from __future__ import annotations

import numpy as np
import torch
from tiny import tiny_causal_lm, tiny_tokenizer

from retrieval_head import RetrievalHeadConfig, get_retrieval_model
from retrieval_head.agent import NativeRetriever
from retrieval_head.retrieval.fingerprint import TeacherFingerprint
from retrieval_head.retrieval.index import DocumentIndex

DIM = 16
NO_SPECIALS = {"suppress_tokens": [0, 1, 2]}  # random tiny LMs would otherwise end turns at random
CONV = [
    {"role": "user", "content": "is breakfast included in the price of the room"},
    {"role": "assistant", "content": "yes it is"},
    {"role": "user", "content": "do they allow pets"},
]
SHORT = [{"role": "user", "content": "where can I park my car"}]
FINGERPRINT = TeacherFingerprint("tiny-teacher", None, DIM, "cosine", True, "a" * 64)


def make_model(arch: str = "llama", layer: int = 2, head_type: str = "mlp", teacher=FINGERPRINT, static_dim: int = 0,
               static_span: str = "text"):
    config = RetrievalHeadConfig(layer=layer, output_dim=DIM, inner_dim=32, head_type=head_type, num_attention_heads=4,
                                 teacher=teacher.to_dict() if teacher else None, static_dim=static_dim,
                                 static_span=static_span)
    model = get_retrieval_model(tiny_causal_lm(arch), config, tokenizer=tiny_tokenizer())
    if static_dim:  # a fresh branch adds zero: give it weights, so the tests see the ids it reads
        torch.nn.init.normal_(model.head.static_out.weight, generator=torch.Generator().manual_seed(5))
    return model


def make_index(fingerprint=FINGERPRINT, n: int = 12) -> DocumentIndex:
    vectors = np.random.default_rng(0).standard_normal((n, DIM)).astype(np.float32)
    return DocumentIndex.from_embeddings(vectors, [f"d{i}" for i in range(n)], fingerprint)


def script(tokenizer, text: str, prompt_width: int):
    """`prefix_allowed_tokens_fn` that makes the LM write `text` then end its turn."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]

    def allowed(batch_id, input_ids):
        step = input_ids.shape[-1] - prompt_width
        return [ids[min(step, len(ids) - 1)]]

    return allowed


def rerun_embedding(agent: NativeRetriever, result) -> torch.Tensor:
    """The head over the same tokens (prompt + generated) in ONE forward, span mask at the same tokens."""
    model = agent.model
    ids = result.prompt_ids + result.generated_ids[: result.span.end]
    with torch.inference_mode():
        states = model.layer_states(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))
    mask = torch.zeros(1, len(ids), dtype=torch.long)
    offset = len(result.prompt_ids)
    mask[0, offset + result.span.start : offset + result.span.end] = 1
    with torch.inference_mode():
        return model.embed_hidden_states(states, mask, torch.tensor([ids]))[0]
