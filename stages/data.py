"""Stage 0: the datasets every later stage reads (DESIGN.md "Parquet schemas").

The embedded world (a simulator with a planted structure and an oracle), tiny preset:
    python stages/data.py synth --out data/synth --preset tiny --seed 0
    python stages/data.py build data/synth            # samples/ + item2item/

Real data:
    python stages/data.py ml100k --out data/ml100k     # MovieLens-100K from the recbole wheel
    python stages/data.py amazon --reviews reviews_Beauty_5.json.gz --meta meta_Beauty.json.gz --out data/beauty
    python stages/data.py import --items items.parquet --events events.parquet --out data/mine

n machines, one world: `synth --preset large --shard i/n` on machine i writes its share of the users.
Same as `onemall data ...`.
"""

from onemall_pl.data.cli import main

if __name__ == "__main__":
    main()
