"""The item catalogue as dense tensors: what the item tower and the SID decoder look up.

Items get a dense index ``0 .. num_items - 1`` in ascending ``item_id`` order (the same for
any shard layout). :meth:`ItemCatalog.index_of` maps raw ids to it with a vectorised
``np.searchsorted`` and names the table, column and row of an unknown id. Per item, indexed
by the dense index:

- ``item_type``   0 product, 1 video, 2 live (``schema.ITEM_TYPES``)
- ``category``    [N, 3] dense L1/L2/L3 ids; 0 is reserved for "no category at this level"
                  (a shorter list, or a negative raw id such as the -1 padding)
- ``price_band``  0 .. num_price_bands - 1, quantile bins of the catalogue's prices; the
                  boundaries (``price_edges``) are kept so another run can reuse them
- ``shop``        dense shop index
- ``product``     the dense index of the product a short-video sells, -1 if none
- ``sid``         [N, L] semantic IDs, once a quantizer's ``sid_table`` is attached

``sizes`` gathers the vocabulary sizes (``num_items``, ``num_categories_l1..3`` counting the
reserved 0, ``num_price_bands``, ``num_shops``, ...) so a stage links them into its model
instead of typing them again.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from onemall_pl.data.schema import ITEM_TYPES, DataError, check_unique, spec
from onemall_pl.io import read_table

CATEGORY_LEVELS = 3
_USED = ("item_id", "item_type", "category", "price", "shop_id", "product_id")


def _columns(items: pa.Table) -> pa.Table:
    """The columns the catalogue uses, in their contract types (values were checked when the
    table was written; titles, texts and images are not read)."""
    ts = spec("items")
    arrays = []
    for name in _USED:
        if name not in items.column_names:
            raise DataError(f"missing column; the table has {items.column_names}", table="items", column=name)
        col, want = items.column(name), ts.column(name)
        try:
            arrays.append(col if col.type.equals(want.type) else col.cast(want.type, safe=True))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as e:
            raise DataError(f"has type {col.type}, expected {want.type} ({e})", table="items",
                            column=name) from None
        if not want.nullable and col.null_count:
            row = int(np.flatnonzero(np.asarray(col.is_null().to_numpy(zero_copy_only=False)))[0])
            raise DataError("null value in a required column", table="items", column=name, row=row)
    if items.num_rows == 0:
        raise DataError("table is empty", table="items")
    return pa.table(dict(zip(_USED, arrays)))


class ItemCatalog:
    """Dense per-item tensors of a dataset's ``items`` table (see the module docstring).

    Args:
        items: the ``items`` table (validated against the data contract here).
        num_price_bands: number of price bands (quantile bins).
        price_edges: reuse these ``num_price_bands - 1`` band boundaries instead of computing
            them from this catalogue's prices (e.g. from an upstream manifest).
    """

    def __init__(self, items: pa.Table, *, num_price_bands: int = 16,
                 price_edges: Sequence[float] | None = None):
        if num_price_bands < 1:
            raise ValueError(f"num_price_bands must be >= 1, got {num_price_bands}")
        items = _columns(items)
        check_unique(items, "items", "item_id")
        ids = items.column("item_id").to_numpy()
        order = np.argsort(ids, kind="stable")
        self.item_ids: np.ndarray = ids[order]
        self._row_of_index = order  # dense index -> row of the items table (for messages)
        n = len(ids)

        codes = pc.index_in(items.column("item_type"), value_set=pa.array(ITEM_TYPES))
        if codes.null_count:
            row = int(np.flatnonzero(np.asarray(codes.is_null().to_numpy(zero_copy_only=False)))[0])
            raise DataError(f"value {items.column('item_type')[row].as_py()!r} not in {list(ITEM_TYPES)}",
                            table="items", column="item_type", row=row)
        self.item_type = torch.from_numpy(codes.to_numpy().astype(np.int64)[order])

        # category: L1..L3, dense per level, 0 = none
        cat = items.column("category").combine_chunks()
        offsets, values = cat.offsets.to_numpy(), cat.flatten().to_numpy()
        offsets = offsets - offsets[0]
        lengths = np.diff(offsets)
        if (lengths > CATEGORY_LEVELS).any():
            row = int(np.flatnonzero(lengths > CATEGORY_LEVELS)[0])
            raise DataError(f"{lengths[row]} category levels, at most {CATEGORY_LEVELS} (L1..L3)",
                            table="items", column="category", row=row)
        raw = np.full((n, CATEGORY_LEVELS), -1, np.int64)
        rows = np.repeat(np.arange(n), lengths)
        raw[rows, np.arange(len(values)) - np.repeat(offsets[:-1], lengths)] = values
        raw = raw[order]
        self.category_ids: list[np.ndarray] = []  # per level: raw id of dense id k+1
        dense = np.zeros_like(raw)
        for level in range(CATEGORY_LEVELS):
            known = raw[:, level] >= 0
            uniq = np.unique(raw[known, level])
            dense[known, level] = np.searchsorted(uniq, raw[known, level]) + 1
            self.category_ids.append(uniq)
        self.category = torch.from_numpy(dense)

        # price bands: quantile bins
        price = items.column("price").to_numpy().astype(np.float64)[order]
        if price_edges is None:
            edges = np.quantile(price, np.linspace(0, 1, num_price_bands + 1)[1:-1]) if n else np.zeros(0)
        else:
            edges = np.asarray(price_edges, np.float64)
            if len(edges) != num_price_bands - 1 or (np.diff(edges) < 0).any():
                raise ValueError(f"price_edges must be {num_price_bands - 1} non-decreasing values "
                                 f"for {num_price_bands} bands, got {list(edges)}")
        self.price_edges: np.ndarray = edges
        self.price_band = torch.from_numpy(np.searchsorted(edges, price, side="right").astype(np.int64))

        shop_ids, shop = np.unique(items.column("shop_id").to_numpy()[order], return_inverse=True)
        self.shop_ids: np.ndarray = shop_ids
        self.shop = torch.from_numpy(shop.astype(np.int64))

        product = items.column("product_id")
        has = np.asarray(product.is_valid().to_numpy(zero_copy_only=False), bool)[order]
        prod = np.full(n, -1, np.int64)
        if has.any():
            pid = pc.fill_null(product, -1).to_numpy()[order]
            prod[has] = self.index_of(pid[has], table="items", column="product_id",
                                      rows=self._row_of_index[has])
        self.product = torch.from_numpy(prod)
        self.sid: torch.Tensor | None = None

    @classmethod
    def load(cls, folder: str | Path, *, num_price_bands: int = 16,
             price_edges: Sequence[float] | None = None, sid_table: str | Path | None = None) -> ItemCatalog:
        """The catalogue of dataset ``folder`` (its ``items`` table), with SIDs if given."""
        cat = cls(read_table(folder, "items", columns=list(_USED), validate=False),
                  num_price_bands=num_price_bands, price_edges=price_edges)
        if sid_table is not None:
            cat.attach_sids(sid_table)
        return cat

    # -- lookups

    def __len__(self) -> int:
        return len(self.item_ids)

    def index_of(self, ids: np.ndarray | Sequence[int], *, table: str | None = None, column: str = "item_id",
                 rows: np.ndarray | None = None) -> np.ndarray:
        """Dense indices of raw item ids (vectorised). An id not in the catalogue raises a
        :class:`DataError` naming ``table``, ``column`` and the row (``rows[i]`` for the i-th id
        when given, else i)."""
        ids = np.asarray(ids, dtype=np.int64)
        idx = np.searchsorted(self.item_ids, ids)
        idx_c = np.minimum(idx, len(self.item_ids) - 1)
        bad = self.item_ids[idx_c] != ids if len(self.item_ids) else np.ones(ids.shape, bool)
        if bad.any():
            i = int(np.flatnonzero(bad.ravel())[0])
            row = int(rows.ravel()[i]) if rows is not None else i
            raise DataError(f"unknown item id {int(ids.ravel()[i])} (not in the items table; "
                            f"{int(bad.sum())} unknown in all)", table=table, column=column, row=row)
        return idx

    def ids_of(self, index: np.ndarray | torch.Tensor) -> np.ndarray:
        """Raw item ids of dense indices."""
        return self.item_ids[np.asarray(index)]

    @property
    def sizes(self) -> dict[str, int]:
        """Vocabulary sizes to link into models (category and shop counts include no reserve
        beyond the category's 0)."""
        out = dict(num_items=len(self), num_item_types=len(ITEM_TYPES),
                   **{f"num_categories_l{i + 1}": len(u) + 1 for i, u in enumerate(self.category_ids)},
                   num_price_bands=len(self.price_edges) + 1, num_shops=len(self.shop_ids))
        if self.sid is not None:
            out["sid_len"] = self.sid.shape[1]
        return out

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every per-item tensor, indexed by the dense item index (e.g. to register as buffers)."""
        out = dict(item_type=self.item_type, category=self.category, price_band=self.price_band,
                   shop=self.shop, product=self.product)
        if self.sid is not None:
            out["sid"] = self.sid
        return out

    # -- semantic IDs

    def attach_sids(self, sid_table: str | Path | pa.Table) -> torch.Tensor:
        """Attach the quantizer's ``sid_table`` (``item_id``, ``item_type``, ``sid: list<int>``,
        a Parquet file or folder of shards): every item needs exactly one SID of a fixed length."""
        name = "sid_table"
        src = None if isinstance(sid_table, pa.Table) else str(sid_table)
        try:
            t = sid_table if isinstance(sid_table, pa.Table) else pq.read_table(sid_table)
        except (pa.ArrowInvalid, OSError) as e:
            raise DataError(f"cannot read ({e})", table=name, file=src) from None
        for c in ("item_id", "item_type", "sid"):
            if c not in t.column_names:
                raise DataError(f"missing column; it has {t.column_names}", table=name, column=c, file=src)
        check_unique(t, name, "item_id", file=src)
        idx = self.index_of(t.column("item_id").to_numpy(), table=name, column="item_id")
        if len(idx) != len(self):
            have = np.zeros(len(self), bool)
            have[idx] = True
            first = int(self.item_ids[np.flatnonzero(~have)[0]])
            raise DataError(f"{int((~have).sum())} catalogue item(s) have no SID (first: item {first})",
                            table=name, column="item_id", file=src)
        types = pc.index_in(t.column("item_type"), value_set=pa.array(ITEM_TYPES)).to_numpy(zero_copy_only=False)
        wrong = types != self.item_type.numpy()[idx]
        if wrong.any():
            row = int(np.flatnonzero(wrong)[0])
            raise DataError(f"item_type {t.column('item_type')[row].as_py()!r} differs from the catalogue's "
                            f"{ITEM_TYPES[int(self.item_type[idx[row]])]!r}", table=name, column="item_type",
                            row=row, file=src)
        sid = t.column("sid").combine_chunks()
        lengths = np.diff(sid.offsets.to_numpy())
        if len(lengths) and (lengths != lengths[0]).any():
            row = int(np.flatnonzero(lengths != lengths[0])[0])
            raise DataError(f"SID of length {lengths[row]}, the first row's has {lengths[0]}", table=name,
                            column="sid", row=row, file=src)
        codes = np.empty((len(self), int(lengths[0]) if len(lengths) else 0), np.int64)
        codes[idx] = sid.flatten().to_numpy().reshape(len(idx), -1)
        self.sid = torch.from_numpy(codes)
        return self.sid
