"""Baseline: TIGER, a T5 encoder-decoder over RQ-VAE semantic IDs, decoded by constrained beam search (Table 2).

    python stages/rqvae.py fit -c configs/rqvae/tiny.yaml && python stages/rqvae.py export -c configs/rqvae/tiny.yaml
    python stages/tiger.py fit    -c configs/tiger/tiny.yaml
    python stages/tiger.py export -c configs/tiger/tiny.yaml        # artifacts/synth/tiger/

Resume after a kill: the same `fit` command with `--ckpt_path last`. Same as `onemall tiger ...`.
"""

from onemall_pl.baselines.tiger import main

if __name__ == "__main__":
    main()
