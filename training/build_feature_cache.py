"""Fill the hidden-state cache for the default pair on every bundled dataset (queries + corpus sentences)."""
import logging
import sys

import torch

from retrieval_head import RetrievalHeadConfig, get_retrieval_model
from retrieval_head.cache import TensorCache
from retrieval_head.data import load_dataset_folder
from retrieval_head.defaults import load_agent
from retrieval_head.features import cached_features

logging.basicConfig(level=logging.INFO)
torch.set_num_threads(2)
base, tok = load_agent()
model = get_retrieval_model(base, RetrievalHeadConfig(max_length=256), tok).eval()
cache = TensorCache(sys.argv[1] if len(sys.argv) > 1 else ".cache/features")
LAYERS = [8, 12, 16, 20, 24, 27, 30]
for name in ["scifact_train", "dstc11_track5_val_reviewdoc", "covidqa", "nq_open_oracle"]:
    ds = load_dataset_folder(f"data/{name}")
    items = [q.as_messages() if q.history else q.text for q in ds.queries]
    print(name, len(items), flush=True)
    cached_features(model, items, cache, LAYERS, ("mean", "last_token"), token_layer=20)
