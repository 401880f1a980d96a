"""Start the static branch from what each token already means, instead of from noise.

A learned table row moves only when its token occurs in the alignment text; rows of tokens never seen in
training stayed at their random init and added nothing at test time, where names, numbers and rare terms live.
Here every row starts as the teacher's own embedding of the token's string (model2vec's idea), reduced by PCA
to the table's width.
The branch's output map is then fitted in closed form (ridge) from the train split's mean rows to the teacher's
query vectors, so at step 0 the branch is already a static retriever in the teacher's space and training refines
it. Measured on the dev splits with a linear probe: see training/EXPERIMENTS.md.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from retrieval_head.io.tensor_cache import TensorCache
from retrieval_head.retrieval.fingerprint import TeacherFingerprint
from retrieval_head.retrieval.teacher import teacher_embeddings
from retrieval_head.training.probe import ridge_fit

logger = logging.getLogger(__name__)


def token_strings(tokenizer: Any, vocab_size: int) -> list[str]:
    """The text of every token id below `vocab_size` (ids past the tokenizer's vocabulary give "")."""
    known = len(tokenizer)
    return [tokenizer.decode([i]) if i < known else "" for i in range(vocab_size)]


def lexical_rows(teacher_rows: torch.Tensor, dim: int, seed: int = 0) -> torch.Tensor:
    """[V, dim] table: the teacher's token vectors, centred, on their top-`dim` principal components (a table
    wider than the teacher gets every component, then small random columns, as a random start would)."""
    centred = teacher_rows.float() - teacher_rows.float().mean(0)
    kept = min(dim, centred.shape[1])
    rng = torch.random.get_rng_state()
    torch.manual_seed(seed)  # pca_lowrank draws a random sketch: keep the table reproducible
    try:
        _, _, components = torch.pca_lowrank(centred, q=min(kept + 8, centred.shape[1]), center=False, niter=4)
        extra = torch.randn(centred.shape[0], dim - kept) * 0.02
    finally:
        torch.random.set_rng_state(rng)
    return torch.cat([centred @ components[:, :kept], extra], dim=1)


def fit_output_map(pooled: torch.Tensor, targets: torch.Tensor, ridge: float = 1.0) -> torch.Tensor:
    """[D, dim] weight (no bias, as the branch's map has none) minimising ||pooled W^T - targets||^2 + ridge ||W||^2."""
    return ridge_fit(pooled, targets, ridge, bias=False).T.contiguous()


def teacher_token_rows(teacher: Any, tokenizer: Any, vocab_size: int, fingerprint: TeacherFingerprint,
                       cache: TensorCache | None, batch_size: int = 1024,
                       show_progress_bar: bool = True) -> torch.Tensor:
    """[V, D] the teacher's query embedding of every token's string, cached by teacher and vocabulary."""
    return teacher_embeddings(teacher, token_strings(tokenizer, vocab_size), cache, fingerprint, kind="query",
                              batch_size=batch_size, show_progress_bar=show_progress_bar)


@torch.no_grad()
def init_static_branch(head: Any, tokenizer: Any, teacher: Any, fingerprint: TeacherFingerprint,
                       cache: TensorCache | None, train_ids: torch.Tensor, train_targets: torch.Tensor,
                       show_progress_bar: bool = True) -> None:
    """Set `head.static` to the lexical table and `head.static_out` to its ridge fit on the train split (over
    the table's mean and, with `static_base_embeddings`, the base's mean input embedding).

    `train_ids` [N, L] (-1 padded) are the train examples' span ids, `train_targets` [N, D] the teacher's vectors.
    """
    if head.static is None:
        raise ValueError("the head has no static branch (static_dim = 0): there is nothing to initialise")
    vocab_size, dim = head.static.weight.shape
    teacher_rows = teacher_token_rows(teacher, tokenizer, vocab_size, fingerprint, cache,
                                      show_progress_bar=show_progress_bar)
    table = lexical_rows(teacher_rows, dim)
    head.static.weight.copy_(table.to(head.static.weight))
    pooled = torch.cat([head.static_pool(train_ids[i : i + 4096].to(head.static.weight.device)).cpu()
                        for i in range(0, train_ids.shape[0], 4096)])
    weight = fit_output_map(pooled, train_targets.float().cpu())
    head.static_out.weight.copy_(weight.to(head.static_out.weight))
    logger.info("static branch initialised from the teacher's token vectors (%d x %d)", vocab_size, dim)
