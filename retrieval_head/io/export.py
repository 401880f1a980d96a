"""A head as a standalone sentence-transformers folder: built-in modules only, loaded with no `trust_remote_code`.

`SentenceTransformer(folder)` then computes what `RetrievalModel.encode` does for texts:

0. `Transformer`: the base cut to the head's layer (blocks past it are not saved and never run), returning
   `hidden_states[layer]` as token embeddings (`tie_last_hidden_states=False`: the block's own output, not the
   final norm's);
1. `Dense` (centring, on token embeddings) + `Normalize` (on token embeddings): the head's per-token
   standardisation, up to a scale that the next `Dense` carries (`LayerNorm`'s epsilon aside);
2. `Pooling` with `include_prompt=False`: the mean over the text's tokens only; the chat template before the
   text is the model's prompt (a causal LM's states of the text do not depend on what follows it);
3. one `Dense` per head layer (GELU between), `Normalize`.

Heads that these modules cannot express (a static branch, a token-level head, an encode adapter, a PEFT
adapter, role prompts inside the span) are refused with the fallback named: the package's own modules,
`SentenceTransformer(head_folder, trust_remote_code=True)` or `retrieval_head.load_sentence_transformer`.
The written folder is checked before it replaces anything: it is loaded back and must give the head's vectors.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from retrieval_head.core.errors import RetrievalHeadError
from retrieval_head.core.layer_states import decoder_layers, inner_model, num_layers_of

FALLBACK = ("load the head folder itself instead: SentenceTransformer(HEAD, trust_remote_code=True) or "
            "retrieval_head.load_sentence_transformer(HEAD) (the package's own modules)")
CHECK_TEXTS = ("what is the best hotel near the station with free parking?",
               "Vitamin D supplements reduce the risk of respiratory infections.",
               "who wrote the novel one hundred years of solitude", "x")
TOLERANCE = 1e-5


class ExportError(RetrievalHeadError, ValueError):
    """The head cannot be written with sentence-transformers' built-in modules, or the export did not match."""


def exportable(model: Any) -> str | None:
    """Why `model`'s head needs the package's own modules, or None when built-in modules express it."""
    config, head = model.config, model.head
    if head.static is not None:
        return ("its static branch (static_dim > 0) reads a learned table of the LM's token ids, and no built-in "
                "sentence-transformers module adds such a bag to a transformer's pooled states")
    if head.token_level:
        return ("it is a token-level head (a transformer head or attention pooling), which no built-in module runs "
                "over the states")
    if head.quantized_to:
        return f"it runs with {head.quantized_to} weights; export the fp32 head (quantize_head(None))"
    if config.pooling != "mean":
        return f"its pooling is {config.pooling!r}; built-in pooling of the text's own tokens is mean only here"
    if config.encode_adapter or config.adapter_name_or_path:
        return "its base carries an adapter (encode adapter or PEFT) that the built-in Transformer would not load"
    if any(config.prompts.values()):
        return "its role prompts are read as part of the text, which a sentence-transformers prompt never is"
    return None


def template_prefix(model: Any) -> str:
    """The rendered text before a query's own tokens (the chat template, or nothing for the plain one)."""
    renderer = model.renderer
    probe = "probe"
    text, start, _ = renderer.render_text(probe)
    return text[:start]


def truncated_base(model: Any) -> torch.nn.Module:
    """A copy of the base's decoder (no LM head) with only the blocks up to the head's layer, returning that
    layer's own output as its last hidden state."""
    import copy

    inner = inner_model(model.base_model)
    layer = model.layer_index
    total = num_layers_of(model.base_model)
    name, blocks = decoder_layers(inner, total)
    cut = copy.deepcopy(inner).float().eval()
    parent = cut.get_submodule(name.rsplit(".", 1)[0]) if "." in name else cut
    setattr(parent, name.rsplit(".", 1)[-1], torch.nn.ModuleList(list(cut.get_submodule(name))[:layer]))
    config = cut.config.get_text_config() if hasattr(cut.config, "get_text_config") else cut.config
    config.num_hidden_layers = layer
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = config.layer_types[:layer]
    config.tie_last_hidden_states = layer == total  # the last layer's index is the final norm's output
    return cut


def head_modules(model: Any, hidden: int) -> list[Any]:
    """The head as sentence-transformers' built-in modules, after the Transformer."""
    from sentence_transformers.base.modules import Dense, Normalize
    from sentence_transformers.sentence_transformer.modules import Pooling

    centre = Dense(hidden, hidden, bias=False, activation_function=torch.nn.Identity(),
                   module_input_name="token_embeddings")
    with torch.no_grad():
        centre.linear.weight.copy_(torch.eye(hidden) - 1.0 / hidden)
    modules = [centre, Normalize(module_input_name="token_embeddings"),
               Pooling(hidden, pooling_mode="mean", include_prompt=False)]
    layers = list(model.head._dense)
    for i, layer in enumerate(layers):
        last = i == len(layers) - 1
        dense = Dense(layer.in_features, layer.out_features, bias=layer.bias is not None,
                      activation_function=torch.nn.Identity() if last else torch.nn.GELU())
        with torch.no_grad():  # unit rows scaled back to the standardised states' norm, sqrt(hidden)
            dense.linear.weight.copy_(layer.weight.float() * (math.sqrt(hidden) if i == 0 else 1.0))
            if layer.bias is not None:
                dense.linear.bias.copy_(layer.bias.float())
        modules.append(dense)
    if model.config.normalize:
        modules.append(Normalize())
    return modules


def build_sentence_transformer(model: Any, work_dir: Path) -> Any:
    """The standalone `SentenceTransformer` (in memory), its base written to `work_dir`."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Transformer

    why = exportable(model)
    if why is not None:
        raise ExportError(f"this head cannot be exported with built-in sentence-transformers modules: {why}; "
                          f"{FALLBACK}.")
    base_dir = work_dir / "base"
    truncated_base(model).save_pretrained(base_dir)
    tokenizer = model.tokenizer
    tokenizer.padding_side = "right"  # the prompt is excluded by position from the left
    tokenizer.save_pretrained(base_dir)
    layer = model.layer_index
    transformer = Transformer(
        str(base_dir), max_seq_length=model.renderer.max_length,
        modality_config={"text": {"method": "forward", "method_output_name": ["hidden_states", layer]}},
        module_output_name="token_embeddings",
    )
    prefix = template_prefix(model)
    prompts = {"query": prefix, "document": prefix}
    st = SentenceTransformer(modules=[transformer, *head_modules(model, model.config.base_hidden_size)],
                             device="cpu", prompts=prompts, default_prompt_name="query",
                             similarity_fn_name=model.similarity_fn_name)
    return st


def card_section(model: Any, diff: float) -> str:
    """What the folder is and how to use it, put before sentence-transformers' generated card."""
    from retrieval_head.version import __version__

    config = model.config
    teacher = (config.teacher or {}).get("teacher_id", "the teacher")
    revision = f" (revision {config.revision})" if config.revision else ""
    return (
        f"# Retrieval head for {config.base_model_name_or_path}{revision}: standalone sentence-transformers form\n\n"
        f"Written by `retrieval-head export` (retrieval-head {__version__}) from sentence-transformers' built-in "
        f"modules only: `SentenceTransformer(\"<this repo or folder>\")` loads it with no `trust_remote_code`. The "
        f"base is cut to the {model.layer_index} blocks the head reads. It embeds **queries** into the space of "
        f"`{teacher}`: index the documents with that teacher (same revision). On the check texts it gave the head's "
        f"own vectors (`RetrievalModel.encode`) to {diff:.1e} (max abs diff). Texts only: conversations, the agent "
        "hook and head-only files need the package form (`RetrievalModel.from_pretrained`).\n\n"
    )


def push_export(folder: str | Path, repo_id: str, *, token: bool | str | None = None, private: bool | None = None,
                revision: str | None = None, commit_message: str | None = None) -> Any:
    """Upload an exported folder to the Hub in one commit (the repo is created if needed)."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    return api.upload_folder(repo_id=repo_id, folder_path=str(folder), revision=revision,
                             commit_message=commit_message or "Standalone sentence-transformers export")


def export_sentence_transformer(
    model: Any, output_dir: str | Path, *, check_texts: Sequence[str] = CHECK_TEXTS, overwrite: bool = False,
) -> dict[str, Any]:
    """Write `model` (a `RetrievalModel`) as a standalone sentence-transformers folder at `output_dir`.

    The folder is built beside `output_dir`, loaded back with `SentenceTransformer(folder)` (no flag) and
    compared with `model.encode` on `check_texts`; only a folder within 1e-5 (times the vectors' norm when it is
    over 1) replaces `output_dir`. Returns
    {"path", "max_abs_diff", "layers", "prompt"}. Raises `ExportError` (nothing written) otherwise.
    """
    from sentence_transformers import SentenceTransformer

    output_dir = Path(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()) and not overwrite:
        raise ExportError(f"{output_dir} exists and is not empty; choose a new folder or pass overwrite=True "
                          "(--overwrite).")
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output_dir.parent, prefix=f".{output_dir.name}.") as tmp:
        work = Path(tmp)
        st = build_sentence_transformer(model, work)
        folder = work / "export"
        st.save(str(folder))
        del st
        loaded = SentenceTransformer(str(folder), device="cpu")
        texts = list(check_texts)
        with torch.inference_mode():
            expected = model.encode(texts, convert_to_tensor=True).float().cpu()
            got = loaded.encode(texts, convert_to_tensor=True).float().cpu()
        diff = float((expected - got).abs().max())
        scale = max(1.0, float(expected.norm(dim=-1).max()))  # unnormalised heads: relative to their norm
        if not diff <= TOLERANCE * scale:
            raise ExportError(f"the exported folder gives other vectors than the head (max abs diff {diff:.2e} > "
                              f"{TOLERANCE:g}): this base or template is not expressed exactly; {FALLBACK}.")
        card = folder / "README.md"
        generated = card.read_text(encoding="utf-8") if card.exists() else ""
        front, sep, body = generated.partition("\n---\n") if generated.startswith("---") else ("", "", generated)
        card.write_text(front + sep + card_section(model, diff) + body, encoding="utf-8")
        if output_dir.exists():
            shutil.rmtree(output_dir)
        folder.replace(output_dir)
    return {"path": str(output_dir), "max_abs_diff": diff, "layers": model.layer_index,
            "prompt": template_prefix(model)}
