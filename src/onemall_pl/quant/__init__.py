"""Quantizers that turn an item embedding into a semantic ID (paper §2.2, §3.1.3, Table 5).

- :mod:`.reskmeans`  residual k-means with faiss (the first levels)
- :mod:`.fsq`        binary FSQ last level (MLP -> bits) and :class:`SIDTokenizer`, the frozen whole
- :mod:`.collision`  conflict / exclusive rates, codebook utilisation, the SID -> items map
"""

from onemall_pl.quant.collision import collision_stats, reverse_map, stats_by_type
from onemall_pl.quant.fsq import BinaryFSQ, FSQConfig, SIDTokenizer
from onemall_pl.quant.reskmeans import ResKMeans, check_embeddings

__all__ = ["BinaryFSQ", "FSQConfig", "ResKMeans", "SIDTokenizer", "check_embeddings", "collision_stats",
           "reverse_map", "stats_by_type"]
