"""The heads shipped for the embedded pair keep the teacher's retrieval quality on held-out DSTC11 dialogues."""

from pathlib import Path

import numpy as np
import pytest
import torch

from retrieval_head import RetrievalModel
from retrieval_head.evaluation import retrieval_metrics
from retrieval_head.evaluation.compare import teacher_texts
from retrieval_head.io.tensor_cache import LayeredCache
from retrieval_head.retrieval.data import load_dataset_folder
from retrieval_head.retrieval.fingerprint import TeacherFingerprint
from retrieval_head.retrieval.teacher import teacher_embeddings

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = {"mlp": ROOT / "heads" / "smollm2-135m-minilm", "linear": ROOT / "heads" / "smollm2-135m-minilm-linear"}
DSTC11 = ROOT / "data" / "dstc11_track5_val_reviewdoc"


@pytest.mark.real_model
@pytest.mark.parametrize("head_type", list(SHIPPED))
def test_shipped_head_retains_teacher_quality_on_held_out_dialogues(head_type, embedded_teacher, tmp_path):
    model = RetrievalModel.from_pretrained(SHIPPED[head_type])
    assert model.config.head_type == head_type
    fingerprint = TeacherFingerprint.from_sentence_transformer(
        embedded_teacher, teacher_id=model.config.teacher["teacher_id"]
    )
    fingerprint.check_matches(TeacherFingerprint.from_dict(model.config.teacher), what="shipped head")
    split = model.config.training["split"]
    dataset = load_dataset_folder(DSTC11)
    test = dataset.split(split["dev"], split["test"], seed=split["seed"]).test
    queries = test.queries[:60]  # a fixed sample of the held-out split: the LM pass costs ~1 s per dialogue

    cache = LayeredCache(tmp_path, [ROOT / "data" / "teacher-embeddings"])
    documents = teacher_embeddings(embedded_teacher, dataset.document_texts(), cache, fingerprint, "document",
                                   show_progress_bar=False)
    texts, _ = teacher_texts(queries, embedded_teacher)
    teacher_q = torch.from_numpy(embedded_teacher.encode(texts, normalize_embeddings=True))
    head_q = torch.from_numpy(model.encode([q.as_messages() for q in queries], normalize_embeddings=True))

    cosine = (head_q * teacher_q).sum(-1)
    # Measured on the whole test split (mlp + static branch / linear): cosine 0.76 / 0.73, nDCG@10 retention
    # 0.78 / 0.85; an untrained head scores near zero. The margins absorb the 60-query sample.
    assert float(cosine.mean()) > 0.6
    qrels = {q.id: dataset.qrels[q.id] for q in queries}
    ids = [q.id for q in queries]
    head = retrieval_metrics((head_q @ documents.T).numpy(), qrels, ids, dataset.doc_ids)
    teacher = retrieval_metrics((teacher_q @ documents.T).numpy(), qrels, ids, dataset.doc_ids)
    assert head["recall@100"] >= 0.6 * teacher["recall@100"]
    assert head["ndcg@10"] >= 0.5 * teacher["ndcg@10"]
    assert np.isfinite(head_q.numpy()).all()


@pytest.mark.real_model
def test_shipped_heads_export_as_standalone_sentence_transformers_or_say_why_not(tmp_path):
    from sentence_transformers import SentenceTransformer

    from retrieval_head.io.export import ExportError, export_sentence_transformer

    with pytest.raises(ExportError, match="static branch.*trust_remote_code=True"):
        export_sentence_transformer(RetrievalModel.from_pretrained(SHIPPED["mlp"]), tmp_path / "mlp")
    assert not (tmp_path / "mlp").exists()
    model = RetrievalModel.from_pretrained(SHIPPED["linear"])
    folder = export_sentence_transformer(model, tmp_path / "linear")["path"]
    texts = [q.text for q in load_dataset_folder(ROOT / "data" / "scifact_train").queries[:24]]
    exported = SentenceTransformer(folder, device="cpu").encode_query(texts, batch_size=8)
    assert np.abs(exported - model.encode_query(texts, batch_size=8)).max() <= 1e-5
