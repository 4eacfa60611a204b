"""The baselines of the paper's Table 2, in the same harness as OneMall (same data, same evaluation).

- :mod:`.sasrec`  SASRec: causal-transformer user tower, item embeddings, faiss ANN retrieval
- :mod:`.rqvae`   TIGER's tokenizer: RQ-VAE over item content embeddings + collision suffix
- :mod:`.tiger`   TIGER: T5 encoder-decoder over SID tokens, constrained beam search
"""
