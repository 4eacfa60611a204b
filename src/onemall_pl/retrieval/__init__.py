"""Retrieval: the SID trie, constrained beam search (OneMall or any HF causal LM), SID -> items."""

from onemall_pl.retrieval.beam import (
                                       BeamResult,
                                       HFStepModel,
                                       StepModel,
                                       beam_search,
                                       bench,
                                       exhaustive_search,
                                       hf_generate,
                                       retrieve,
)
from onemall_pl.retrieval.trie import SIDTrie

__all__ = ["BeamResult", "HFStepModel", "SIDTrie", "StepModel", "beam_search", "bench", "exhaustive_search",
           "hf_generate", "retrieve"]
