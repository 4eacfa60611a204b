"""The baselines of the paper's Table 2, in the same harness as OneMall (same data, same evaluation).

- :mod:`.sasrec`  SASRec: causal-transformer user tower, item embeddings, faiss ANN retrieval
- :mod:`.rqvae`   TIGER's tokenizer: RQ-VAE over item content embeddings + collision suffix
- :mod:`.tiger`   TIGER: T5 encoder-decoder over SID tokens, constrained beam search
"""

from onemall_pl.metrics import flat_metrics


class RetrievalEvalHooks:
    """Validation / test epoch hooks shared by the baselines' LightningModules.

    The module's ``validation_step`` (also its ``test_step``) updates ``self.val_metrics``, a
    :class:`~onemall_pl.metrics.RetrievalMetrics`; each epoch logs it under ``val/`` or ``test/``.
    Put it first among the bases so these hooks take precedence.
    """

    def on_validation_epoch_start(self) -> None:
        self.val_metrics.reset()

    def on_test_epoch_start(self) -> None:
        self.val_metrics.reset()

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def _log_retrieval(self, prefix: str) -> None:
        self.log_dict(flat_metrics(self.val_metrics.compute(), prefix))
        self.val_metrics.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_retrieval("val/")

    def on_test_epoch_end(self) -> None:
        self._log_retrieval("test/")
