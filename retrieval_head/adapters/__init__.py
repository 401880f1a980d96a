"""PEFT interop: the agent's adapter under a head (`recorded`: record, check, rebuild it on load) and the head's
own optional encode adapter (`encode_adapter`: a LoRA switched on only while the head encodes)."""

from retrieval_head.adapters.encode_adapter import EncodeAdapterError, add_encode_adapter, has_encode_adapter
from retrieval_head.adapters.recorded import (
    AdapterFingerprint,
    AdapterMismatchError,
    adapter_checksum,
    fingerprint_adapter,
    load_adapter,
    merge_adapter,
)

__all__ = [
    "AdapterFingerprint",
    "AdapterMismatchError",
    "EncodeAdapterError",
    "adapter_checksum",
    "add_encode_adapter",
    "fingerprint_adapter",
    "has_encode_adapter",
    "load_adapter",
    "merge_adapter",
]
