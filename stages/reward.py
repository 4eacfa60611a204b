"""The ranking model, trained on exposure logs; stage 4 uses it as its reward model (paper §2.1, §3.3).

CPU (the embedded world, a couple of minutes):
    python stages/reward.py fit    -c configs/reward/tiny.yaml
    python stages/reward.py export -c configs/reward/tiny.yaml    # artifacts/synth/reward/

Cluster (DDP on every GPU; SLURM: see configs/trainer/slurm.yaml):
    python stages/reward.py fit -c configs/reward/tiny.yaml -c configs/trainer/ddp.yaml \\
        --data.data_dir data/<dataset> --trainer.default_root_dir runs/<dataset>/reward \\
        --model.net.d_model 128 --model.net.d_emb 32 --data.batch_size 4096
    python stages/reward.py export -c configs/reward/tiny.yaml --data.data_dir data/<dataset> \\
        --trainer.default_root_dir runs/<dataset>/reward --model.net.d_model 128 --model.net.d_emb 32
    (export rebuilds the model from the same arguments, then loads the last checkpoint)

Resume after a kill: the same `fit` command with `--ckpt_path last`. Same as `onemall reward ...`.
"""

from onemall_pl.reward import main

if __name__ == "__main__":
    main()
