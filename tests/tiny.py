"""Tiny random causal LMs and a tiny chat tokenizer, built from configs: no weights, no network."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "where can I park my car near the hotel", "is breakfast included in the price of the room",
    "the restaurant serves vegetarian food and has outdoor seating", "do they allow pets in the guest house",
    "what is the capital of France", "claims about proteins and cells in biomedical abstracts",
    "user assistant system hello there how are you today thanks a lot",
] * 5
ARCHITECTURES = {
    "llama": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256),
    "qwen2": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256),
    "gpt2": dict(n_embd=32, n_layer=3, n_head=4, n_positions=256),
    "gemma3_text": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=8, max_position_embeddings=256, sliding_window=4,
                        layer_types=["sliding_attention", "sliding_attention", "full_attention"]),
}


def tiny_tokenizer(chat: bool = True) -> PreTrainedTokenizerFast:
    """A BPE tokenizer trained on a few sentences, with ChatML special tokens and template."""
    special = ["<|pad|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    from tokenizers import decoders

    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|im_end|>",
                                   bos_token="<|im_start|>")
    if chat:
        fast.chat_template = CHATML
    return fast


def tiny_causal_lm(arch: str = "llama", seed: int = 0, vocab_size: int = 300) -> torch.nn.Module:
    """A randomly initialised causal LM of the given architecture (fp32, eval mode)."""
    torch.manual_seed(seed)
    config = AutoConfig.for_model(arch, vocab_size=vocab_size, **ARCHITECTURES[arch])
    config.pad_token_id = 0
    config.bos_token_id = config.eos_token_id = 2
    model = AutoModelForCausalLM.from_config(config)
    return model.eval()


def save_tiny(folder: Path, arch: str = "llama") -> Path:
    """Write a tiny base + tokenizer to `folder` (a stand-in for a Hub id in load tests)."""
    tiny_causal_lm(arch).save_pretrained(folder)
    tiny_tokenizer(chat=arch != "gpt2").save_pretrained(folder)
    return folder
