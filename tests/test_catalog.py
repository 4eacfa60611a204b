import numpy as np
import pyarrow as pa
import pytest

from onemall_pl.data.catalog import ItemCatalog
from onemall_pl.data.schema import DataError
from onemall_pl.io import write_table


def _items(**over):
    cols = dict(item_id=[50, 10, 30, 20, 40], item_type=["video", "product", "live", "product", "video"],
                title=list("abcde"), text=[None] * 5, images=pa.nulls(5, pa.list_(pa.binary())),
                category=pa.array([[7, 70], [3, 31, 310], [3], [7, 71, -1], [3, 31, 311]], pa.list_(pa.int32())),
                price=pa.array([5.0, 1.0, 0.0, 100.0, 9.0], pa.float32()),
                shop_id=[900, 100, 900, 500, 100], product_id=[20, None, None, None, 99])
    cols.update(over)
    return pa.table(cols)


def test_catalog_tensors_and_sizes(tmp_path):
    items = _items(product_id=[20, None, None, None, 10])
    write_table(tmp_path, "items", items)
    cat = ItemCatalog.load(tmp_path, num_price_bands=2)
    assert cat.item_ids.tolist() == [10, 20, 30, 40, 50]  # dense index = ascending id
    assert cat.index_of(np.array([[50, 10], [30, 30]])).tolist() == [[4, 0], [2, 2]]
    assert cat.ids_of(np.array([1, 3])).tolist() == [20, 40]
    assert cat.item_type.tolist() == [0, 0, 2, 1, 1]  # product, product, live, video, video
    # L1 raw {3, 7} -> 1, 2; L2 {31, 70, 71} -> 1..3; L3 {310, 311}; missing / -1 -> 0
    assert cat.category.tolist() == [[1, 1, 1], [2, 3, 0], [1, 0, 0], [1, 1, 2], [2, 2, 0]]
    assert cat.price_band.tolist() == [0, 1, 0, 1, 1] and cat.price_edges.tolist() == [5.0]
    assert cat.shop.tolist() == [0, 1, 2, 0, 2]
    assert cat.product.tolist() == [-1, -1, -1, 0, 1]  # item 40 sells 10, item 50 sells 20
    assert cat.sizes == dict(num_items=5, num_item_types=3, num_categories_l1=3, num_categories_l2=4,
                             num_categories_l3=3, num_price_bands=2, num_shops=3)
    same = ItemCatalog(items, num_price_bands=2, price_edges=[50.0])
    assert same.price_band.tolist() == [0, 1, 0, 0, 0]


def test_unknown_ids_are_named():
    with pytest.raises(DataError, match=r"table 'items', column 'product_id', row 4: unknown item id 99"):
        ItemCatalog(_items())
    cat = ItemCatalog(_items(product_id=[None] * 5))
    with pytest.raises(DataError, match=r"table 'samples', column 'seq_click', row 7: unknown item id 11"):
        cat.index_of(np.array([10, 11, 12]), table="samples", column="seq_click", rows=np.array([3, 7, 9]))
    with pytest.raises(DataError, match="column 'item_id'.*duplicated"):
        ItemCatalog(_items(item_id=[1, 2, 3, 2, 5], product_id=[None] * 5))
    with pytest.raises(DataError, match="column 'category', row 1: 4 category levels"):
        ItemCatalog(_items(product_id=[None] * 5,
                           category=pa.array([[1], [1, 2, 3, 4], [1], [1], [1]], pa.list_(pa.int32()))))


def test_sid_table():
    cat = ItemCatalog(_items(product_id=[None] * 5))
    sids = pa.table(dict(item_id=[30, 10, 20, 50, 40], item_type=["live", "product", "product", "video", "video"],
                         sid=pa.array([[3, 0, 1], [1, 0, 0], [2, 0, 0], [5, 1, 1], [4, 1, 0]], pa.list_(pa.int32()))))
    sid = cat.attach_sids(sids)
    assert sid.tolist() == [[1, 0, 0], [2, 0, 0], [3, 0, 1], [4, 1, 0], [5, 1, 1]]
    assert cat.sizes["sid_len"] == 3 and "sid" in cat.tensors()
    with pytest.raises(DataError, match="1 catalogue item.*no SID.*item 50"):
        cat.attach_sids(sids.filter(pa.array([True] * 3 + [False, True])))
    bad_type = sids.set_column(1, "item_type", pa.array(["live", "product", "video", "video", "video"]))
    with pytest.raises(DataError, match="column 'item_type', row 2"):
        cat.attach_sids(bad_type)


def test_collate_maps_ids_through_the_catalog():
    from onemall_pl.data.datasets import collate_sequences

    cat = ItemCatalog(_items(product_id=[None] * 5))
    t = pa.table({"seq_click": pa.array([[50, 10], [30]], pa.list_(pa.int64())),
                  "targets": pa.array([[20], [99]], pa.list_(pa.int64()))})
    out = collate_sequences(t.slice(0, 1), {"seq_click": 3}, set_columns={"targets": 1}, item_index=cat)
    assert out["seq_click"].tolist() == [[0, 4, 0]] and out["seq_click_mask"].tolist() == [[False, True, True]]
    assert out["targets"].tolist() == [[1]]
    with pytest.raises(DataError, match="column 'targets', row 1: unknown item id 99"):
        collate_sequences(t, {"seq_click": 3}, set_columns={"targets": 1}, item_index=cat)
