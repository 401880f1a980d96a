import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from training_helpers import tiny_recipe

from retrieval_head.training.datasets import plan_sources

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_cpu_processes_train_identical_weights(tmp_path):
    recipe = tiny_recipe(tmp_path).replace(**{"train.max_steps": 6, "train.eval_every": 3, "train.save_every": 3})
    recipe.save(tmp_path / "recipe.yaml")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    accelerate = Path(sys.executable).with_name("accelerate")
    command = [str(accelerate), "launch", "--config_file", str(REPO / "training/accelerate/cpu-2proc.yaml"),
               "--main_process_port", str(free_port()), str(Path(__file__).with_name("ddp_script.py")),
               str(tmp_path / "recipe.yaml"), str(tmp_path / "out")]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = sorted((tmp_path / "out").glob("rank*.safetensors"))
    assert [p.name for p in ranks] == ["rank0-of-2.safetensors", "rank1-of-2.safetensors"]
    a, b = (load_file(str(p)) for p in ranks)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    start = json.loads((tmp_path / "out/train_log.jsonl").read_text().splitlines()[0])
    assert start["processes"] == 2
    assert (tmp_path / "out/retrieval_head.safetensors").is_file()
    # the LM features were extracted once, each process its share of the shards (one shard per source here)
    extracted = [json.loads((tmp_path / f"out/extracted-rank{r}.json").read_text()) for r in (0, 1)]
    texts = [json.loads(json.dumps(item)) for plan in plan_sources(recipe) for item in plan.items]
    assert extracted[0] and extracted[1] and sorted(map(str, extracted[0] + extracted[1])) == sorted(map(str, texts))
