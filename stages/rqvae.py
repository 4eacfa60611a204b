"""Baseline: TIGER's RQ-VAE item tokenizer (k-means init, commitment loss, collision suffix).

    python stages/rqvae.py fit    -c configs/rqvae/tiny.yaml
    python stages/rqvae.py export -c configs/rqvae/tiny.yaml        # artifacts/synth/rqvae/ (TIGER reads it)

Same as `onemall rqvae ...`.
"""

from onemall_pl.baselines.rqvae import main

if __name__ == "__main__":
    main()
