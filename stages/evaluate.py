"""Evaluation: replay held-out requests through every model (paper §4).

    python stages/evaluate.py compare --data_dir data/synth --artifacts artifacts   # Table 2: OneMall vs TIGER vs SASRec
    python stages/evaluate.py rl --data_dir data/synth --sid_artifact artifacts/synth/quantize   # Table 4 + offline A/B

Same as `onemall evaluate ...`; `onemall report --dataset synth` then renders the tables and plots.
"""

from onemall_pl.evaluate import main

if __name__ == "__main__":
    main()
