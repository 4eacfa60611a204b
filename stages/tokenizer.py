"""Stage 1: fine-tune the item encoder on item2item pairs, export item embeddings (paper 3.1.1-3.1.2).

CPU (the embedded world, a few minutes):
    python stages/tokenizer.py fit    -c configs/tokenizer/tiny.yaml
    python stages/tokenizer.py export -c configs/tokenizer/tiny.yaml   # artifacts/synth/tokenizer/

Cluster (Qwen2.5-1.5B + Swin-T, bf16, DDP on every GPU; SLURM: see configs/trainer/slurm.yaml):
    python stages/tokenizer.py fit -c configs/tokenizer/paper.yaml -c configs/trainer/ddp.yaml \\
        --data.data_dir data/<dataset> --trainer.default_root_dir runs/<dataset>/tokenizer
    python stages/tokenizer.py export -c configs/tokenizer/paper.yaml --data.data_dir data/<dataset> \\
        --trainer.default_root_dir runs/<dataset>/tokenizer

Resume after a kill: the same `fit` command with `--ckpt_path last`. Same as `onemall tokenizer ...`.
"""

from onemall_pl.tokenizer import main

if __name__ == "__main__":
    main()
