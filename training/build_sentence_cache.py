"""Fill the hidden-state cache with corpus sentences of the bundled datasets, exactly as the default recipe
samples them (`retrieval_head.training.datasets.corpus_sentences`, seed = sample_seed + dataset position)."""
import logging
import sys

import torch

from retrieval_head import RetrievalHeadConfig, get_retrieval_model
from retrieval_head.cache import TensorCache
from retrieval_head.data import load_dataset_folder
from retrieval_head.defaults import load_agent
from retrieval_head.features import cached_features
from retrieval_head.training.datasets import corpus_sentences

logging.basicConfig(level=logging.INFO)
torch.set_num_threads(2)
COUNT = int(sys.argv[2]) if len(sys.argv) > 2 else 1500
base, tok = load_agent()
model = get_retrieval_model(base, RetrievalHeadConfig(max_length=256), tok).eval()
cache = TensorCache(sys.argv[1] if len(sys.argv) > 1 else ".cache/features")
LAYERS = [8, 12, 16, 20, 24, 27, 30]
ORDER = ["dstc11_track5_val_reviewdoc", "scifact_train", "covidqa", "nq_open_oracle"]
for name in sys.argv[3].split(",") if len(sys.argv) > 3 else ORDER:
    position = ORDER.index(name)
    items = corpus_sentences(load_dataset_folder(f"data/{name}"), COUNT, seed=position)
    print(name, len(items), flush=True)
    cached_features(model, items, cache, LAYERS, ("mean", "last_token"), token_layer=20)
