"""Stage 2: semantic IDs: Res-Kmeans levels (faiss) + a binary FSQ level, per item type (paper §2.2, §3.1.3).

CPU (the embedded world, about a minute; needs artifacts/synth/tokenizer from stage 1):
    python stages/quantize.py fit    -c configs/quantize/tiny.yaml
    python stages/quantize.py export -c configs/quantize/tiny.yaml      # artifacts/synth/quantize/
    python stages/quantize.py ablate --artifact artifacts/synth/quantize    # Table 5 -> artifacts/synth/reports/
    python stages/quantize.py refresh-live --artifact artifacts/synth/quantize --at <ts>
    python stages/quantize.py predict --artifact artifacts/synth/quantize --embeddings new.parquet --out sids.parquet

Cluster (paper sizes [4096, 4096] + 4096 FSQ; k-means on the GPU with faiss-gpu, FSQ with DDP):
    python stages/quantize.py fit -c configs/quantize/paper.yaml -c configs/trainer/ddp.yaml \\
        --data.tokenizer_dir artifacts/<dataset>/tokenizer --data.data_dir data/<dataset> \\
        --trainer.default_root_dir runs/<dataset>/quantize
    python stages/quantize.py export -c configs/quantize/paper.yaml \\
        --data.tokenizer_dir artifacts/<dataset>/tokenizer --data.data_dir data/<dataset>
    (the k-means levels and the live two-tower are prepared once, on rank 0, into
    runs/<dataset>/quantize/prepared; the other ranks wait for them and train the FSQ levels)

Pure Res-Kmeans (the Table 5 baseline as its own artifact): add -c configs/quantize/tiny_reskmeans.yaml.
Resume after a kill: the same `fit` command with `--ckpt_path last`. Same as `onemall quantize ...`.
"""

from onemall_pl.quantize import main

if __name__ == "__main__":
    main()
