"""Pretraining stage (stage 3): next-token prediction over SIDs + contrastive alignment (paper §3.2, Eq. 7).

In progress. Owner: pretrain helper. Provides ``PretrainModule`` (LightningModule), ``SamplesDataModule``
(LightningDataModule over the ``samples`` table with SIDs from the quantize artifact), the ``sweep``
subcommand (Table 1 / Table 6 at CPU scale) and ``bench()``.
"""
