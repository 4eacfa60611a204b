"""Baseline: SASRec, a causal-transformer user tower over the item sequence, retrieved with faiss (Table 2).

    python stages/sasrec.py fit    -c configs/sasrec/tiny.yaml
    python stages/sasrec.py export -c configs/sasrec/tiny.yaml      # artifacts/synth/sasrec/
    MovieLens-100K (literature protocol: leave-one-out, full ranking): -c configs/sasrec/ml100k.yaml

Resume after a kill: the same `fit` command with `--ckpt_path last`. Same as `onemall sasrec ...`.
"""

from onemall_pl.baselines.sasrec import main

if __name__ == "__main__":
    main()
