"""The agent hook: the LM writes its own search query and the head embeds it from generation's own states.

`NativeRetriever` (retriever.py) drives generation and search; `prompts` asks the LM for its query;
`capture` keeps the head's layer while the LM runs; `span` finds the query among the generated tokens;
`results` holds what a turn returns; `turn` is the whole turn, search first (`SearchFirstAgent`);
`passage_cache` keeps passages' keys and values for its answer prompts (`PassageCache`).
"""

from retrieval_head.agent.capture import CapturePoint, LayerCapture, find_capture_point
from retrieval_head.agent.passage_cache import PASSAGE_FORMAT, PassageCache
from retrieval_head.agent.prompts import DEFAULT_CLOSE, DEFAULT_INSTRUCTION, DEFAULT_OPEN, QueryPrompt
from retrieval_head.agent.results import AgentResult, ConversationEmbedding, Hit, TurnCache
from retrieval_head.agent.retriever import NativeRetriever
from retrieval_head.agent.span import EmptyQuerySpanError, QuerySpan, find_query_span
from retrieval_head.agent.turn import RagTurn, SearchFirstAgent

__all__ = [
    "DEFAULT_CLOSE",
    "DEFAULT_INSTRUCTION",
    "DEFAULT_OPEN",
    "PASSAGE_FORMAT",
    "AgentResult",
    "CapturePoint",
    "ConversationEmbedding",
    "EmptyQuerySpanError",
    "Hit",
    "LayerCapture",
    "NativeRetriever",
    "PassageCache",
    "QueryPrompt",
    "QuerySpan",
    "RagTurn",
    "SearchFirstAgent",
    "TurnCache",
    "find_capture_point",
    "find_query_span",
]
