"""Stage 4: RL post-training with the ranking model as reward, DPO (Eq. 9) or GRPO (Eq. 10) (paper §3.3).

CPU (the embedded tiny world; needs artifacts/synth/{quantize,pretrain,reward}):
    python stages/rl.py fit    -c configs/rl/tiny_grpo.yaml
    python stages/rl.py export -c configs/rl/tiny_grpo.yaml       # artifacts/synth/rl_grpo/
    python stages/rl.py fit    -c configs/rl/tiny_dpo.yaml && python stages/rl.py export -c configs/rl/tiny_dpo.yaml
    onemall evaluate rl --data_dir data/synth                     # Table 4 + offline A/B -> artifacts/synth/evaluate/

Cluster (DDP on every GPU; SLURM: see configs/trainer/slurm.yaml):
    python stages/rl.py fit -c configs/rl/paper_grpo.yaml -c configs/trainer/ddp.yaml \\
        --data.data_dir data/<dataset> --trainer.default_root_dir runs/<dataset>/rl_grpo
    python stages/rl.py export -c configs/rl/paper_grpo.yaml \\
        --data.data_dir data/<dataset> --trainer.default_root_dir runs/<dataset>/rl_grpo

Resume after a kill: the same `fit` command with `--ckpt_path last` (policy, reference, optimiser,
schedule and the training stream's position). Same as `onemall rl ...`.
"""

from onemall_pl.rl import main

if __name__ == "__main__":
    main()
