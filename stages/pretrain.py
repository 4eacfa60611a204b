"""Stage 3: pretrain the OneMall model, NTP over semantic IDs + in-batch contrastive (paper §3.2, Eq. 7).

CPU (the embedded tiny world; needs data/synth and artifacts/synth/quantize):
    python stages/pretrain.py fit    -c configs/pretrain/tiny.yaml
    python stages/pretrain.py export -c configs/pretrain/tiny.yaml     # artifacts/synth/pretrain/
    python stages/pretrain.py sweep  -c configs/pretrain/tiny.yaml     # Table 1 + Table 6 at CPU scale
    Two CPU processes (gloo): add  -c configs/trainer/ddp.yaml --trainer.devices 2

Cluster (DDP on every GPU; SLURM: see configs/trainer/slurm.yaml), a Table-1 row:
    python stages/pretrain.py fit -c configs/pretrain/paper-0.5b-a0.1b.yaml -c configs/trainer/ddp.yaml \\
        --data.data_dir data/<dataset> --trainer.default_root_dir runs/<dataset>/pretrain
    python stages/pretrain.py export -c configs/pretrain/paper-0.5b-a0.1b.yaml \\
        --data.data_dir data/<dataset> --trainer.default_root_dir runs/<dataset>/pretrain

Resume after a kill: the same `fit` command with `--ckpt_path last` (model, optimiser, schedule, MoE
biases and the training stream's position). Same as `onemall pretrain ...`.
"""

from onemall_pl.pretrain import main

if __name__ == "__main__":
    main()
