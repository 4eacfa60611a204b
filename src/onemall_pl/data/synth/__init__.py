"""The embedded e-commerce world simulator (DESIGN.md, "The embedded world").

    from onemall_pl.data.synth import generate, World
    generate("data/synth", preset="tiny", seed=0)         # or: onemall data synth --preset tiny
    world = World.load("data/synth")                      # the ground truth it was drawn from
    p_click, p_order, e_gmv = world.expected(user_id, ts, "product_card", item_ids)

See :mod:`.world` for the generative model, :mod:`.presets` for sizes, :mod:`.generate`
for the folder layout and sharding.
"""

from onemall_pl.data.synth.generate import bench, generate, parse_shard
from onemall_pl.data.synth.presets import PRESETS, WorldConfig, preset
from onemall_pl.data.synth.world import World

__all__ = ["PRESETS", "World", "WorldConfig", "bench", "generate", "parse_shard", "preset"]
