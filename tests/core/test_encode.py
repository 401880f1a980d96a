"""Tests for encode(): sentence-transformers semantics, conversations, batching invariance and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from core_helpers import ARCHS, TEXTS, make_model, one_thread
from sentence_transformers.quantization import quantize_embeddings

pytestmark = pytest.mark.usefixtures(one_thread.__name__)

CONVERSATION = [
    {"role": "user", "content": "is there a hotel near the restaurant"},
    {"role": "assistant", "content": "yes the guest house is near"},
    {"role": "user", "content": "do they allow pets"},
]


@pytest.fixture(scope="module")
def model():
    """A llama-based head that does not normalise, so encode()'s own options are visible."""
    return make_model("llama", normalize=False, prompts={"query": "q: ", "document": ""})


def test_string_gives_1d_and_list_gives_2d(model) -> None:
    one = model.encode("where can I park")
    many = model.encode(["where can I park", "hi"])
    assert isinstance(one, np.ndarray) and one.shape == (16,) and one.dtype == np.float32
    assert isinstance(many, np.ndarray) and many.shape == (2, 16) and many.dtype == np.float32
    assert np.allclose(many[0], one, atol=1e-6)
    assert model.encode(("where can I park",)).shape == (1, 16)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(("pooling", "head_type"), [("mean", "mlp"), ("last_token", "mlp"), ("mean", "transformer")])
def test_same_embedding_alone_and_in_a_padded_batch(arch: str, pooling: str, head_type: str) -> None:
    m = make_model(arch, pooling=pooling, head_type=head_type, normalize=False)
    items = [*TEXTS, "", CONVERSATION]
    batched = m.encode(items, batch_size=len(items))
    alone = np.stack([m.encode(item) for item in items])
    assert np.abs(batched - alone).max() < 1e-5


def test_order_is_restored_after_length_sorting(model) -> None:
    texts = ["hi", "where can I park my car near the hotel tonight", "is breakfast included", "", "what"]
    alone = np.stack([model.encode(t) for t in texts])
    for batch_size in (1, 2, 3, 32):
        assert np.abs(model.encode(texts, batch_size=batch_size) - alone).max() < 1e-5


def test_batches_are_sorted_longest_first(model, monkeypatch) -> None:
    seen = []
    real = model.embed

    def spy(batch, prompt=""):
        seen.append(list(batch))
        return real(batch, prompt=prompt)

    monkeypatch.setattr(model, "embed", spy)
    texts = ["a b", "a b c d e f", "a", "a b c d", "a b c"]
    model.encode(texts, batch_size=2)
    assert seen == [["a b c d e f", "a b c d"], ["a b c", "a b"], ["a"]]


def test_batch_size_must_be_positive(model) -> None:
    with pytest.raises(ValueError, match="batch_size"):
        model.encode(["hi"], batch_size=0)
    with pytest.raises(ValueError, match=r"positive integer, got '8' \(str\)"):
        model.encode(["hi"], batch_size="8")


@pytest.mark.parametrize(("inputs", "message"), [({}, "got a dict"), (b"hello", "got bytes; decode"),
                                                 (bytearray(b"hi"), "got bytes")])
def test_inputs_that_are_not_text_are_a_clear_error(model, inputs, message: str) -> None:
    with pytest.raises(TypeError, match=message):
        model.encode(inputs)


def test_show_progress_bar(model, capsys) -> None:
    model.encode(TEXTS, batch_size=2, show_progress_bar=True)
    shown = capsys.readouterr().err
    assert "Batches" in shown and "3/3" in shown
    model.encode(TEXTS, batch_size=2, show_progress_bar=False)
    model.encode(TEXTS, batch_size=2)
    assert "Batches" not in capsys.readouterr().err


def test_convert_to_tensor_and_numpy(model) -> None:
    array = model.encode(TEXTS)
    tensor = model.encode(TEXTS, convert_to_tensor=True)
    assert isinstance(tensor, torch.Tensor) and tensor.shape == (len(TEXTS), 16) and tensor.dtype == torch.float32
    assert np.allclose(tensor.numpy(), array, atol=1e-6)
    single = model.encode("hi", convert_to_tensor=True)
    assert isinstance(single, torch.Tensor) and single.shape == (16,)
    rows = model.encode(TEXTS, convert_to_numpy=False)
    assert isinstance(rows, list) and len(rows) == len(TEXTS)
    assert all(isinstance(r, torch.Tensor) and r.shape == (16,) for r in rows)
    assert np.allclose(torch.stack(rows).numpy(), array, atol=1e-6)
    assert isinstance(model.encode("hi", convert_to_numpy=False), torch.Tensor)


def test_normalize_embeddings(model) -> None:
    raw = model.encode(TEXTS)
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0, atol=1e-3)
    normed = model.encode(TEXTS, normalize_embeddings=True)
    assert np.allclose(np.linalg.norm(normed, axis=1), 1.0, atol=1e-5)
    assert np.allclose(normed, raw / np.linalg.norm(raw, axis=1, keepdims=True), atol=1e-5)


def test_truncate_dim_before_normalise(model) -> None:
    raw = model.encode(TEXTS)
    short = model.encode(TEXTS, truncate_dim=4, normalize_embeddings=True)
    expected = raw[:, :4] / np.linalg.norm(raw[:, :4], axis=1, keepdims=True)
    assert short.shape == (len(TEXTS), 4)
    assert np.allclose(short, expected, atol=1e-5)
    assert model.encode("hi", truncate_dim=4).shape == (4,)


@pytest.mark.parametrize(("precision", "dtype", "width"),
                         [("int8", np.int8, 16), ("uint8", np.uint8, 16), ("binary", np.int8, 2),
                          ("ubinary", np.uint8, 2)])
def test_precision_uses_sentence_transformers_quantization(model, precision: str, dtype, width: int) -> None:
    raw = model.encode(TEXTS)
    quantized = model.encode(TEXTS, precision=precision)
    assert quantized.dtype == dtype and quantized.shape == (len(TEXTS), width)
    assert np.array_equal(quantized, quantize_embeddings(raw, precision=precision))


def test_unknown_precision_and_output_value(model) -> None:
    with pytest.raises(ValueError, match="precision"):
        model.encode("hi", precision="float8")
    with pytest.raises(ValueError, match="output_value"):
        model.encode("hi", output_value="token_embeddings")


def test_prompt_and_prompt_name(model) -> None:
    plain = model.encode("q: where can I park")
    assert np.allclose(model.encode("where can I park", prompt="q: "), plain, atol=1e-6)
    assert np.allclose(model.encode("where can I park", prompt_name="query"), plain, atol=1e-6)
    assert np.allclose(model.encode_query("where can I park"), plain, atol=1e-6)
    assert np.allclose(model.encode_document("where can I park"), model.encode("where can I park"), atol=1e-6)
    # an explicit prompt wins over prompt_name, as in sentence-transformers
    assert np.allclose(model.encode("where can I park", prompt_name="query", prompt=""),
                       model.encode("where can I park"), atol=1e-6)
    assert not np.allclose(plain, model.encode("where can I park"), atol=1e-4)


def test_unknown_prompt_name_is_an_error(model) -> None:
    with pytest.raises(ValueError, match=r"prompt_name='passage'.*\['document', 'query'\]"):
        model.encode("hi", prompt_name="passage")


def test_device(model) -> None:
    out = model.encode(TEXTS[:2], device="cpu", convert_to_tensor=True)
    assert out.device.type == "cpu" and model.device.type == "cpu"
    assert np.allclose(out.numpy(), model.encode(TEXTS[:2]), atol=1e-6)


def test_a_device_this_machine_lacks_is_a_clear_error(model, monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="sees no CUDA GPU; use device='cpu'"):
        model.encode(TEXTS[:1], device="cuda:7")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match="has 1 CUDA GPU"):
        model.encode(TEXTS[:1], device="cuda:7")
    with pytest.raises(ValueError, match="not a torch device"):
        model.encode(TEXTS[:1], device="gpu-please")
    assert model.device.type == "cpu"  # nothing moved


def test_no_grad_and_mode_restored(model) -> None:
    model.train()
    try:
        out = model.encode(TEXTS, convert_to_tensor=True)
        assert not out.requires_grad and out.grad_fn is None
        assert model.training and model.head.training
        # dropout is off while encoding: the result equals the one in eval mode
        assert np.allclose(out.numpy(), make_model("llama", normalize=False).encode(TEXTS), atol=1e-6)
    finally:
        model.eval()


def test_unknown_kwargs_raise_type_error(model) -> None:
    with pytest.raises(TypeError, match="normalise_embeddings"):
        model.encode("hi", normalise_embeddings=True)


def test_a_conversation_is_one_input(model) -> None:
    one = model.encode(CONVERSATION)
    assert one.shape == (16,)
    many = model.encode([CONVERSATION, "do they allow pets", CONVERSATION[:1]])
    assert many.shape == (3, 16)
    assert np.allclose(many[0], one, atol=1e-5)
    # the history is read: the same last message alone gives another embedding ...
    assert not np.allclose(one, many[1], atol=1e-4)
    # ... and a one-message conversation is the bare text
    assert np.allclose(many[2], model.encode(CONVERSATION[0]["content"]), atol=1e-6)


def test_conversation_uses_the_chat_template(model) -> None:
    rendered = model.renderer.render_text(CONVERSATION)[0]
    assert rendered.count("<|im_start|>") == 3
    states_model = make_model("llama", normalize=False, query_template="plain")
    assert not np.allclose(states_model.encode(CONVERSATION), model.encode(CONVERSATION), atol=1e-4)


def test_empty_list_gives_empty_array(model) -> None:
    out = model.encode([])
    assert isinstance(out, np.ndarray) and out.shape == (0, 16)
    tensor = model.encode([], convert_to_tensor=True)
    assert isinstance(tensor, torch.Tensor) and tensor.shape == (0, 16)


@pytest.mark.parametrize("arch", ARCHS)
def test_empty_string_gives_a_valid_embedding(arch: str) -> None:
    m = make_model(arch)
    out = m.encode("")
    assert out.shape == (16,) and np.isfinite(out).all()
    assert np.isclose(np.linalg.norm(out), 1.0, atol=1e-5)
    assert np.abs(m.encode(["", "hi"])[0] - out).max() < 1e-5


@pytest.mark.parametrize(("items", "index"), [(["a", 3], 1), ([None, "b"], 0), (["a", "b", ["x", "y"]], 2)])
def test_non_string_item_names_its_index(model, items, index: int) -> None:
    with pytest.raises(TypeError, match=rf"index {index}\b"):
        model.encode(items)


def test_long_text_is_truncated_at_max_length() -> None:
    m = make_model("llama", query_template="plain", max_length=6)
    start = "where can I park my car near the hotel"
    assert np.abs(m.encode(start) - m.encode(start + " and is breakfast included in the price")).max() < 1e-6
    assert len(m.renderer.render(start * 10).input_ids) == 6


def test_long_history_is_cut_from_the_left() -> None:
    question = {"role": "user", "content": "do they allow pets"}
    keep = len(make_model("llama").renderer.render(question["content"]).input_ids) + 2  # + a bit of template
    m = make_model("llama", max_length=keep)
    a = [{"role": "user", "content": "the restaurant serves vegetarian food " * 30},
         {"role": "assistant", "content": "yes"}, question]
    b = [{"role": "user", "content": "what is the capital of France " * 50},
         {"role": "assistant", "content": "yes"}, question]
    ra, rb = m.renderer.render(a), m.renderer.render(b)
    assert len(ra.input_ids) == keep and ra.input_ids == rb.input_ids
    assert m.tokenizer.decode(ra.input_ids[ra.span_start : ra.span_end]) == "do they allow pets"
    assert np.abs(m.encode(a) - m.encode(b)).max() < 1e-6


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_text_longer_than_the_models_context_is_truncated(arch: str) -> None:
    m = make_model(arch, max_length=4096)  # the tiny bases read 256 positions
    long = "where can I park my car near the hotel " * 80
    assert len(m.renderer.render(long).input_ids) == 256
    out = m.encode([long, "hi"])
    assert out.shape == (2, 16) and np.isfinite(out).all()
