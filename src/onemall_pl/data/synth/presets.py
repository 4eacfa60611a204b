"""The world's knobs (:class:`WorldConfig`) and its size presets.

=======  ========  =======  ======  =====  =========  =====  ===========  ===================
preset   products  videos   lives   ent.   users      days   exposures    meant for
=======  ========  =======  ======  =====  =========  =====  ===========  ===================
micro    150       60       10      50     80         5      ~2k          unit tests (< 2 s)
tiny     2,000     800      100     600    1,000      14     ~150k        the CPU pipeline
small    20,000    8,000    600     5,000  8,000      30     ~1.1M        a laptop, benchmarks
medium   200,000   60,000   3,000   40k    100,000    30     ~10M         one GPU (streamed)
large    1M        300,000  20,000  200k   2,000,000  60     ~450M        a cluster (--shard i/n)
=======  ========  =======  ======  =====  =========  =====  ===========  ===================

Behaviour parameters (click / order model, exposure policy) are the same in every preset,
so a model's quality on ``tiny`` says something about ``large``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class WorldConfig:
    # --- catalogue
    n_l1: int = 8
    """commerce L1 categories (at most 12)"""
    l2_per_l1: tuple[int, int] = (3, 5)
    """L2 categories per L1, drawn uniformly in [lo, hi] (hi at most 12)"""
    l3_per_l2: tuple[int, int] = (2, 4)
    """L3 categories per L2, drawn uniformly in [lo, hi] (hi at most 16)"""
    ent_l3_per_genre: int = 2
    """L3s per entertainment genre (formats: Clips, Vlogs, ...; at most 4)"""
    n_shops: int = 120
    n_products: int = 2_000
    n_videos: int = 800
    """e-commerce short-videos (each sells one product)"""
    n_lives: int = 100
    n_ent_videos: int = 600
    """entertainment short-videos (sell nothing; seen in the watch log)"""
    # --- users and time
    n_users: int = 1_000
    n_days: int = 14
    t0: int = 1_704_067_200
    """timestamp (s) of day 0, 00:00 UTC"""
    requests_per_day: float = 1.5
    """mean requests per user and day (each user's rate is this times a log-normal activity)"""
    request_size: tuple[int, int] = (5, 10)
    """exposures per request, uniform in [lo, hi]"""
    block_users: int = 16_384
    """users per generation block: the unit of randomness and of sharding"""
    # --- rendering
    image_size: int = 32
    max_frames: int = 6
    """frames of a short-video (each has 2..max_frames)"""
    image_pool: int = 0
    """0: render a unique image per item; k > 0: reuse k variants per (category, price band)"""
    # --- users' latent taste
    n_interests: tuple[int, int] = (2, 5)
    """L3 interests per user, uniform in [lo, hi]"""
    interest_alpha: float = 0.8
    """Dirichlet concentration of a user's interest weights"""
    p_interest_same_l1: float = 0.4
    """chance that a further interest lies in the L1 of the first one"""
    focus_days: tuple[float, float] = (0.5, 3.0)
    """a user's current focus (one of their interests) lasts this many days (uniform per user)"""
    style_dim: int = 8
    """dimension of the user x item style factors"""
    # --- popularity and exposure policy
    zipf_a: float = 1.0
    """item popularity ~ rank^-zipf_a within each item type"""
    category_zipf_a: float = 0.6
    """category popularity ~ rank^-category_zipf_a (products and interests)"""
    p_personal: float = 0.6
    """chance an exposure comes from the user's interests (else: global popularity)"""
    # --- click -> order funnel (logits)
    click_bias: tuple[float, float, float] = (-2.0, -2.2, -1.8)
    """click logit bias of the scenario's own item type: product_card, short_video, live_stream"""
    off_type_bias: float = -3.0
    """extra click logit of an item shown in a scenario that does not expose its type"""
    sim_l2: float = 0.25
    """interest similarity of a sibling L3 (same L2)"""
    sim_l1: float = 0.04
    """interest similarity of a cousin L3 (same L1)"""
    interest_eps: float = 0.01
    """affinity = log(eps + interest similarity) + ..."""
    focus_bonus: float = 1.0
    """click logit bonus of an item in the user's current focus"""
    style_weight: float = 1.0
    watch_weight: float = 0.3
    """weight of the user's watching taste for a video's / live's genre"""
    price_click_weight: float = 0.3
    """click logit -= weight * price_sensitivity * price z-score"""
    order_bias: float = -2.3
    order_affinity_weight: float = 0.5
    # --- watch log
    p_watch_before: float = 0.7
    """chance a request is preceded by entertainment watching"""
    p_watch_linked: float = 0.6
    """chance a pre-request watch is of a genre linked to the user's current focus"""
    background_watches_per_day: float = 1.0
    long_view_s: float = 20.0
    """what the simulator calls a long view (recorded in dataset.json for the build stage)"""

    def __post_init__(self):
        if not 1 <= self.n_l1 <= 12:
            raise ValueError(f"n_l1={self.n_l1}: the world has names for 1..12 L1 categories")
        if not (1 <= self.l2_per_l1[0] <= self.l2_per_l1[1] <= 12):
            raise ValueError(f"l2_per_l1={self.l2_per_l1}: need 1 <= lo <= hi <= 12")
        if not (1 <= self.l3_per_l2[0] <= self.l3_per_l2[1] <= 16):
            raise ValueError(f"l3_per_l2={self.l3_per_l2}: need 1 <= lo <= hi <= 16")
        if not 1 <= self.ent_l3_per_genre <= 4:
            raise ValueError(f"ent_l3_per_genre={self.ent_l3_per_genre}: need 1..4")
        for name in ("n_shops", "n_products", "n_videos", "n_lives", "n_ent_videos", "n_users", "n_days",
                     "block_users"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 1")
        if not (1 <= self.request_size[0] <= self.request_size[1]):
            raise ValueError(f"request_size={self.request_size}: need 1 <= lo <= hi")
        if not 1 <= self.max_frames <= 6:
            raise ValueError(f"max_frames={self.max_frames}: a short-video has 1..6 frames")
        if not (1 <= self.n_interests[0] <= self.n_interests[1]):
            raise ValueError(f"n_interests={self.n_interests}: need 1 <= lo <= hi")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> WorldConfig:
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = set(d) - set(fields)
        if unknown:
            raise ValueError(f"unknown WorldConfig field(s) {sorted(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


PRESETS: dict[str, WorldConfig] = {
    "micro": WorldConfig(n_l1=4, l2_per_l1=(2, 2), l3_per_l2=(2, 2), n_shops=12, n_products=150, n_videos=60,
                         n_lives=10, n_ent_videos=50, n_users=80, n_days=5, requests_per_day=0.8,
                         block_users=32, max_frames=3),
    "tiny": WorldConfig(),
    "small": WorldConfig(n_l1=10, l2_per_l1=(4, 8), l3_per_l2=(3, 5), n_shops=1_000, n_products=20_000,
                         n_videos=8_000, n_lives=600, n_ent_videos=5_000, n_users=8_000, n_days=30,
                         requests_per_day=0.6, block_users=8_192),
    "medium": WorldConfig(n_l1=12, l2_per_l1=(6, 10), l3_per_l2=(4, 8), n_shops=8_000, n_products=200_000,
                          n_videos=60_000, n_lives=3_000, n_ent_videos=40_000, n_users=100_000, n_days=30,
                          requests_per_day=0.45, image_pool=8),
    "large": WorldConfig(n_l1=12, l2_per_l1=(8, 12), l3_per_l2=(6, 12), n_shops=40_000, n_products=1_000_000,
                         n_videos=300_000, n_lives=20_000, n_ent_videos=200_000, n_users=2_000_000, n_days=60,
                         requests_per_day=0.5, image_pool=8),
}


def preset(name: str) -> WorldConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]
