import json

import pytest
import torch
from safetensors.torch import load_file
from training_helpers import FakeTeacher, tiny_models, tiny_recipe

from retrieval_head import RetrievalHeadConfig
from retrieval_head.training import RecipeMismatchError, TeacherDimError, Trainer, TrainingStopped, train
from retrieval_head.training.losses import DistillationLoss


def run(recipe, out, **kwargs):
    base, tok, teacher = tiny_models()
    return train(recipe, out, base=base, tokenizer=tok, teacher=teacher, show_progress_bar=False, **kwargs)


def weights(folder):
    return load_file(str(folder / "model.safetensors"))


def test_training_writes_head_log_report_and_probe(tmp_path):
    result = run(tiny_recipe(tmp_path), tmp_path / "out")
    out = tmp_path / "out"
    assert result.steps == 12 and result.best_step in (4, 8, 12)
    for name in ("config.json", "retrieval_head.safetensors", "README.md", "recipe.yaml", "train_log.jsonl",
                 "report.json"):
        assert (out / name).is_file(), name
    config = RetrievalHeadConfig.from_json_file(out / "config.json")
    assert config.output_dim == 16 and config.teacher["dim"] == 16
    assert config.metrics["tiny"]["split"] == "test" and "ndcg@10" in config.metrics["tiny"]["head"]
    assert {(r["layer"], r["pooling"]) for r in config.probe["results"]} == {
        (layer, p) for layer in (1, 2, 3) for p in ("mean", "last_token")}
    assert config.training["losses"] == {"alignment": 1.0, "contrastive": 0.1, "rank": 0.1}
    assert config.training["base_dtype"] == "float32"  # the tiny base's: what its features were extracted in
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    steps = [r for r in log if "loss/total" in r]
    assert [r["step"] for r in steps] == list(range(1, 13))
    assert {"loss/alignment", "loss/contrastive", "loss/rank"} <= set(steps[0])
    assert [r["step"] for r in log if r.get("event") == "eval"] == [4, 8, 12]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-12", "step-8"]  # keep_checkpoints=2
    # train.keep = last (default): the saved head = the last step's weights, evaluated on test
    saved = load_file(str(out / "retrieval_head.safetensors"))["project.0.weight"]
    assert torch.equal(saved, weights(out / "checkpoints/step-12")["head.project.0.weight"])
    assert json.loads((out / "report.json").read_text())["kept_step"] == 12 == result.kept_step


def test_keep_best_writes_the_best_dev_head_not_the_last(tmp_path, monkeypatch):
    import retrieval_head.training.trainer as trainer_module

    scores = iter([0.9, 0.5, 0.4])  # the dev score of the evaluations at steps 4, 8, 12: the best is the first
    monkeypatch.setattr(trainer_module, "score", lambda report, metric: next(scores))
    recipe = tiny_recipe(tmp_path).replace(**{"train.keep": "best"})
    result = run(recipe, tmp_path / "out")
    out = tmp_path / "out"
    assert result.kept_step == result.best_step == 4
    saved = load_file(str(out / "retrieval_head.safetensors"))["project.0.weight"]
    assert torch.equal(saved, load_file(str(out / "best" / "retrieval_head.safetensors"))["project.0.weight"])
    last = weights(out / "checkpoints/step-12")["head.project.0.weight"]
    assert not torch.equal(saved, last)
    # a finished run resumed with the other choice rewrites its folder with that head, training nothing more
    again = run(recipe.replace(**{"train.keep": "last"}), out, resume=True)
    assert again.kept_step == 12 and again.steps == 12
    assert torch.equal(load_file(str(out / "retrieval_head.safetensors"))["project.0.weight"], last)


def test_training_is_deterministic_on_cpu(tmp_path):
    recipe = tiny_recipe(tmp_path)
    run(recipe, tmp_path / "a")
    run(recipe, tmp_path / "b")
    a, b = weights(tmp_path / "a/checkpoints/step-12"), weights(tmp_path / "b/checkpoints/step-12")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_after_kill_gives_the_same_weights(tmp_path):
    recipe = tiny_recipe(tmp_path).replace(**{"train.save_every": 3})  # 4 batches an epoch: step 3 is mid-epoch
    run(recipe, tmp_path / "full")
    killed = run(recipe, tmp_path / "resumed", stop_after_steps=5)  # killed after step 5; last checkpoint: 3
    assert killed.stopped and killed.steps == 5
    with pytest.raises(FileExistsError, match="--resume"):
        run(recipe, tmp_path / "resumed")
    result = run(recipe, tmp_path / "resumed", resume=True)
    assert result.steps == 12
    log = (tmp_path / "resumed" / "train_log.jsonl").read_text()
    assert '"checkpoint": "step-3"' in log
    a, b = weights(tmp_path / "full/checkpoints/step-12"), weights(tmp_path / "resumed/checkpoints/step-12")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_with_another_recipe_is_refused(tmp_path):
    recipe = tiny_recipe(tmp_path)
    run(recipe, tmp_path / "out", stop_after_steps=4)
    with pytest.raises(RecipeMismatchError) as err:
        run(recipe.replace(**{"train.lr": 5e-4, "head.layer": 2}), tmp_path / "out", resume=True)
    assert "train.lr: 0.001 -> 0.0005" in str(err.value) and "head.layer: 3 -> 2" in str(err.value)
    run(recipe.replace(**{"train.log_every": 3}), tmp_path / "out", resume=True)  # harmless change: allowed


def test_nan_loss_stops_with_message_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    calls = {"n": 0}
    original = DistillationLoss.forward

    def flaky(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 7:
            raise FloatingPointError("the alignment loss is not finite (nan)")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(DistillationLoss, "forward", flaky)
    with pytest.raises(TrainingStopped) as err:
        run(tiny_recipe(tmp_path), tmp_path / "out")
    message = str(err.value)
    assert "step 7" in message and "not finite" in message and "step-4" in message and "train.lr" in message
    out = tmp_path / "out"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-4"]
    assert (out / "best" / "retrieval_head.safetensors").is_file()
    assert '"event": "stopped"' in (out / "train_log.jsonl").read_text()


def test_teacher_dim_mismatch_fails_before_any_work(tmp_path):
    recipe = tiny_recipe(tmp_path).replace(**{"head.output_dim": 384})
    base, tok, _ = tiny_models()
    with pytest.raises(TeacherDimError, match="output_dim=384.*16 dimensions"):
        Trainer(recipe, tmp_path / "out", base=base, tokenizer=tok, teacher=FakeTeacher(dim=16))
    assert not (tmp_path / "cache").exists() and not (tmp_path / "out").exists()


def test_transformer_head_on_span_tokens_and_gold_positives(tmp_path):
    recipe = tiny_recipe(tmp_path).replace(**{
        "head.head_type": "transformer", "train.max_steps": 4, "loss.gold_positives": True,
        "loss.hard_negatives": 2, "train.grad_accum": 2})
    result = run(recipe, tmp_path / "out")
    assert result.steps == 4 and result.probe is None
    assert RetrievalHeadConfig.from_json_file(tmp_path / "out/config.json").head_type == "transformer"


def test_probe_select_trains_the_best_layer(tmp_path):
    result = run(tiny_recipe(tmp_path).replace(**{"probe.select": True, "train.max_steps": 2}), tmp_path / "out")
    config = RetrievalHeadConfig.from_json_file(tmp_path / "out/config.json")
    assert (config.layer, config.pooling) == (result.probe["best"]["layer"], result.probe["best"]["pooling"])


def test_second_run_reuses_the_caches(tmp_path, monkeypatch):
    recipe = tiny_recipe(tmp_path).replace(**{"train.max_steps": 1})
    run(recipe, tmp_path / "a")
    import retrieval_head.training.features as features

    monkeypatch.setattr(features, "extract_features", lambda *a, **k: pytest.fail("LM pass not cached"))
    calls = []
    encode = FakeTeacher.encode
    monkeypatch.setattr(FakeTeacher, "encode", lambda self, texts, **k: calls.append(texts) or encode(self, texts, **k))
    run(recipe, tmp_path / "b")
    assert len(calls) == 1 and len(calls[0]) == 4  # only the fingerprint's probe sentences


def test_read_only_caches_are_reused_not_written(tmp_path, monkeypatch):
    recipe = tiny_recipe(tmp_path).replace(**{"train.max_steps": 1})
    run(recipe, tmp_path / "a")
    shipped = tmp_path / "cache"
    before = sorted(p.name for p in shipped.iterdir())
    import retrieval_head.training.features as features

    monkeypatch.setattr(features, "extract_features", lambda *a, **k: pytest.fail("LM pass not reused"))
    layered = recipe.replace(**{"features.cache_dir": str(tmp_path / "fresh-cache"),
                                "features.read_only_caches": [str(shipped)]})
    run(layered, tmp_path / "b")
    assert sorted(p.name for p in shipped.iterdir()) == before


def test_a_static_branch_trains_on_the_cached_span_ids_and_is_saved(tmp_path):
    recipe = tiny_recipe(tmp_path).replace(**{"head.static_dim": 4, "train.max_steps": 6})
    run(recipe, tmp_path / "out")
    config = RetrievalHeadConfig.from_json_file(tmp_path / "out/config.json")
    assert config.static_dim == 4 and config.base_vocab_size == 300
    saved = load_file(str(tmp_path / "out/retrieval_head.safetensors"))
    assert saved["static.weight"].shape == (300, 4)
    assert saved["static_out.weight"].abs().sum() > 0  # zero at init: the loss reached the branch


def test_ema_head_is_what_dev_sees_and_what_is_saved_and_it_survives_resume(tmp_path):
    recipe = tiny_recipe(tmp_path).replace(**{"train.ema_decay": 0.9, "train.eval_every": 12,
                                              "train.save_every": 3})
    result = run(recipe, tmp_path / "full")
    assert result.best_step == 12
    saved = load_file(str(tmp_path / "full" / "retrieval_head.safetensors"))
    raw = weights(tmp_path / "full/checkpoints/step-12")
    ema = torch.load(tmp_path / "full/checkpoints/step-12/custom_checkpoint_1.pkl", weights_only=True)
    key = "project.0.weight"
    assert not torch.allclose(saved[key], raw[f"head.{key}"])  # the saved head is not the last step's weights ...
    assert torch.equal(saved[key], ema[f"module.{key}"])  # ... but their average, as checkpointed
    killed = run(recipe, tmp_path / "resumed", stop_after_steps=5)  # last checkpoint: step 3, mid-epoch
    assert killed.stopped
    run(recipe, tmp_path / "resumed", resume=True)
    resumed = load_file(str(tmp_path / "resumed" / "retrieval_head.safetensors"))
    assert all(torch.equal(saved[k], resumed[k]) for k in saved)


def test_input_regularizers_change_training_and_keep_it_finite(tmp_path):
    plain = tiny_recipe(tmp_path).replace(**{"head.static_dim": 8, "train.static_init": "random"})
    run(plain, tmp_path / "plain")
    run(plain.replace(**{"train.token_dropout": 0.3, "train.feature_dropout": 0.2}), tmp_path / "reg")
    a, b = weights(tmp_path / "plain/checkpoints/step-12"), weights(tmp_path / "reg/checkpoints/step-12")
    assert all(torch.isfinite(v).all() for v in b.values())
    assert not torch.equal(a["head.static.weight"], b["head.static.weight"])


def test_per_dataset_batches_train_and_resume_to_the_same_weights(tmp_path):
    recipe = tiny_recipe(tmp_path).replace(**{"train.batches": "per_dataset", "train.save_every": 3})
    run(recipe, tmp_path / "full")
    run(recipe, tmp_path / "resumed", stop_after_steps=5)
    run(recipe, tmp_path / "resumed", resume=True)
    a, b = weights(tmp_path / "full/checkpoints/step-12"), weights(tmp_path / "resumed/checkpoints/step-12")
    assert all(torch.isfinite(v).all() for v in a.values()) and all(torch.equal(a[k], b[k]) for k in a)


def test_attention_pooling_trains_on_span_tokens_with_a_weighted_static_branch(tmp_path):
    from retrieval_head import RetrievalModel

    recipe = tiny_recipe(tmp_path).replace(**{"head.pooling": "attention", "head.static_dim": 4,
                                              "train.max_steps": 6})
    result = run(recipe, tmp_path / "out")
    assert result.steps == 6
    saved = load_file(str(tmp_path / "out/retrieval_head.safetensors"))
    assert saved["attend.weight"].shape == (4 + 1, 32)  # 4 groups of dims + the static ids' weights
    assert saved["attend.weight"].abs().sum() > 0  # zero at init: the loss reached the scores
    base, tok, _ = tiny_models()
    model = RetrievalModel.from_pretrained(str(tmp_path / "out"), base_model=base, tokenizer=tok)
    assert model.config.pooling == "attention" and model.head.token_level
    one = model.encode("the second text", convert_to_tensor=True)
    batch = model.encode(["a much longer first text than the other one", "the second text"], convert_to_tensor=True)
    assert torch.allclose(one, batch[1], atol=1e-5)
