"""The agent hook: the LM writes its own search query and the head embeds it from generation's own states.

`NativeRetriever` (retriever.py) drives generation and search; `capture` keeps the head's layer while the LM
runs; `span` finds the query among the generated tokens; `results` holds what a turn returns.
"""

from .capture import CapturePoint, LayerCapture, find_capture_point
from .results import AgentResult, ConversationEmbedding, Hit, TurnCache
from .retriever import DEFAULT_CLOSE, DEFAULT_INSTRUCTION, DEFAULT_OPEN, NativeRetriever, QueryPrompt
from .span import EmptyQuerySpanError, QuerySpan, find_query_span

__all__ = [
    "DEFAULT_CLOSE",
    "DEFAULT_INSTRUCTION",
    "DEFAULT_OPEN",
    "AgentResult",
    "CapturePoint",
    "ConversationEmbedding",
    "EmptyQuerySpanError",
    "Hit",
    "LayerCapture",
    "NativeRetriever",
    "QueryPrompt",
    "QuerySpan",
    "TurnCache",
    "find_capture_point",
    "find_query_span",
]
