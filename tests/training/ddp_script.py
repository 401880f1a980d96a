"""Run by `accelerate launch` in test_ddp.py: train the tiny recipe, save each rank's final head weights and the
texts its LM pass extracted."""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from training_helpers import tiny_models  # noqa: E402

from retrieval_head.training import Recipe, Trainer, features  # noqa: E402


def main() -> None:
    torch.set_num_threads(1)
    recipe, out = Recipe.load(sys.argv[1]), Path(sys.argv[2])
    base, tok, teacher = tiny_models()
    holder, extracted = {}, []
    real = features.extract_features

    def counting(model, items, *args, **kwargs):
        extracted.extend(items)
        return real(model, items, *args, **kwargs)

    features.extract_features = counting

    def on_step(step, parts):
        if step == recipe.train.max_steps:
            state = trainer.model.head.state_dict()
            holder["state"] = {k: v.detach().clone().contiguous() for k, v in state.items()}

    trainer = Trainer(recipe, out, base=base, tokenizer=tok, teacher=teacher, show_progress_bar=False,
                      on_step=on_step)
    trainer.run()
    acc = trainer.accelerator
    save_file(holder["state"], str(out / f"rank{acc.process_index}-of-{acc.num_processes}.safetensors"))
    (out / f"extracted-rank{acc.process_index}.json").write_text(json.dumps(extracted))


if __name__ == "__main__":
    main()
