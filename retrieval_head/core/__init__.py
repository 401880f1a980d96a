"""The core: a head config, the head, pooling, input templates and `RetrievalModel` with `encode()`.

It knows nothing of the Hub, PEFT, training or the agent. `RetrievalModel`'s `from_pretrained`,
`save_pretrained` and `push_to_hub` (in `io/`) and its adapter checks (in `adapters/`) are imported inside
those methods, never at module level (ARCHITECTURE.md).
"""
