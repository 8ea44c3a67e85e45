#!/usr/bin/env python3
"""The raw limit for the embeddings benchmark: sentence-transformers' `encode` in this process,
over a corpus (a JSON list of texts on stdin), at each batch size given; prints one JSON line per
batch size: texts/s (best of the passes after a warm-up pass) and the padding waste of its
length-sorted batches (padded tokens / real tokens). Run with the project's .venv python:

    .venv/bin/python bench/peers/st_encode.py MODEL_DIR --threads 2 --batch 16,32,64 < corpus.json
"""

import argparse
import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", default="16,32,64,128")
    ap.add_argument("--seconds", type=float, default=15.0)
    args = ap.parse_args()
    texts = json.load(sys.stdin)
    import numpy as np
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(args.threads)
    model = SentenceTransformer(args.model_dir, device="cpu")
    tok = model.tokenizer
    lengths = [len(tok(t, truncation=True, max_length=model.max_seq_length)["input_ids"]) for t in texts]
    # encode() sorts by text length (characters), longest first, then cuts batches
    order = np.argsort([-len(t) for t in texts])
    for batch in [int(b) for b in args.batch.split(",")]:
        model.encode(texts[: batch * 2], batch_size=batch)  # warm-up
        passes, best, t_end = 0, 0.0, time.perf_counter() + args.seconds
        while time.perf_counter() < t_end or passes == 0:
            t0 = time.perf_counter()
            model.encode(texts, batch_size=batch)
            best = max(best, len(texts) / (time.perf_counter() - t0))
            passes += 1
        padded = sum(len(order[i:i + batch]) * max(lengths[j] for j in order[i:i + batch])
                     for i in range(0, len(texts), batch))
        print(json.dumps({"batch": batch, "texts_per_s": best, "passes": passes,
                          "padding_waste": padded / sum(lengths)}), flush=True)


if __name__ == "__main__":
    main()
