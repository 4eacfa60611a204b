"""Words of the embedded world: category names, their vocabularies, and generated texts.

Text follows the category tree so a text encoder can tell categories apart:

- every L1 category has a real-world name and a list of nouns; each L2 under it takes one of
  those nouns ("Electronics/Headphones");
- every L3 is its L2 noun with a modifier ("Headphones Sport") and owns a few made-up
  product-line words ("zorvi", "kaleth") that appear only in its items' texts;
- entertainment genres (the entertainment branch of the tree) have their own words.

A product title mixes the shop's brand, a price-band word, generic adjectives and the
words of its L3 / L2 / L1 (in that order of likelihood); descriptions and short-video
OCR/ASR texts reuse the same words, so every text of an item "talks about" its category.
"""

from __future__ import annotations

import random

import numpy as np

# L1 commerce categories: name, nouns (one per L2, up to 12), linked entertainment genres
# (a user interested in the category tends to watch these genres; paper 3.1.1 "watching").
L1_CATEGORIES: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...] = (
    ("Apparel", ("Dress", "Jacket", "Jeans", "Sweater", "Shirt", "Skirt", "Coat", "Hoodie", "Scarf",
                 "Socks", "Blouse", "Shorts"), ("Fashion", "Travel")),
    ("Beauty", ("Lipstick", "Serum", "Foundation", "Mascara", "Perfume", "Cleanser", "Moisturizer",
                "Eyeliner", "Sunscreen", "Toner", "Blush", "Shampoo"), ("Makeup", "Fashion")),
    ("Electronics", ("Headphones", "Phone", "Charger", "Speaker", "Camera", "Laptop", "Tablet",
                     "Smartwatch", "Keyboard", "Mouse", "Monitor", "Earbuds"), ("Tech", "Gaming", "Music")),
    ("Home", ("Pillow", "Blanket", "Lamp", "Curtain", "Rug", "Vase", "Towel", "Mattress", "Shelf",
              "Clock", "Mirror", "Candle"), ("DIY",)),
    ("Kitchen", ("Pan", "Knife", "Blender", "Kettle", "Mug", "Plate", "Spatula", "Toaster", "Pot",
                 "Grater", "Bowl", "Teapot"), ("Cooking",)),
    ("Food", ("Tea", "Coffee", "Snack", "Noodles", "Chocolate", "Honey", "Nuts", "Rice", "Sauce",
              "Cookies", "Jerky", "Juice"), ("Cooking",)),
    ("Sports", ("Dumbbell", "Sneakers", "Racket", "Bicycle", "Helmet", "Ball", "Jersey", "Tent",
                "Backpack", "Gloves", "Treadmill", "Mat"), ("Fitness", "Outdoors")),
    ("Toys", ("Puzzle", "Doll", "Blocks", "Robot", "Plush", "Drone", "Kite", "Dinosaur", "Train",
              "Marbles", "Yoyo", "Slime"), ("Parenting", "Gaming")),
    ("Pets", ("Kibble", "Litter", "Leash", "Kennel", "Aquarium", "Birdcage", "Chewtoy", "Collar",
              "Scratcher", "Harness", "Treats", "Brush"), ("Pets",)),
    ("Auto", ("Tire", "Dashcam", "Wiper", "Motoroil", "Seatcover", "Jumpstarter", "Floormat", "Polish",
              "Headlight", "Toolkit", "Airfreshener", "Carwax"), ("Cars", "DIY")),
    ("Baby", ("Diaper", "Stroller", "Bottle", "Crib", "Bib", "Pacifier", "Onesie", "Wipes", "Teether",
              "Carrier", "Highchair", "Rattle"), ("Parenting",)),
    ("Stationery", ("Notebook", "Pen", "Novel", "Planner", "Marker", "Comic", "Pencil", "Stapler",
                    "Sketchbook", "Eraser", "Binder", "Calendar"), ("Study", "Music")),
)

# L3 modifiers: an L3 is "<L2 noun> <modifier>" (up to 16 L3 per L2).
MODIFIERS = ("Classic", "Pro", "Mini", "Kids", "Outdoor", "Smart", "Eco", "Travel", "Luxury", "Vintage",
             "Sport", "Home", "Max", "Lite", "Plus", "Studio")

# Entertainment genres (the L2s of the entertainment branch) and their words. The first five
# are the genres the paper filters out of the watching relation (3.1.1): in this world they
# are watched by everyone, whatever their shopping interests, so they carry no commerce signal.
FILTERED_GENRES = ("News", "Comedy", "Dance", "Film/TV", "Selfie")
GENRE_WORDS: dict[str, tuple[str, ...]] = {
    "News": ("breaking", "report", "headline", "update", "anchor", "press"),
    "Comedy": ("prank", "skit", "joke", "funny", "laugh", "parody"),
    "Dance": ("choreography", "moves", "routine", "groove", "ballet", "hiphop"),
    "Film/TV": ("trailer", "scene", "episode", "series", "movie", "recap"),
    "Selfie": ("selfie", "pose", "filter", "glow", "closeup", "mood"),
    "Makeup": ("tutorial", "look", "contour", "glam", "palette", "brushes"),
    "Fashion": ("haul", "outfit", "lookbook", "styling", "runway", "trend"),
    "Tech": ("unboxing", "review", "specs", "benchmark", "gadget", "setup"),
    "Gaming": ("gameplay", "speedrun", "boss", "quest", "level", "controller"),
    "Music": ("cover", "song", "guitar", "beat", "concert", "remix"),
    "DIY": ("build", "repair", "woodwork", "renovation", "tools", "craft"),
    "Cooking": ("recipe", "chef", "dish", "bake", "taste", "homemade"),
    "Fitness": ("workout", "gym", "cardio", "stretch", "training", "reps"),
    "Outdoors": ("hiking", "camping", "trail", "fishing", "mountain", "campfire"),
    "Parenting": ("toddler", "family", "mom", "dad", "nursery", "bedtime"),
    "Pets": ("puppy", "kitten", "cute", "rescue", "grooming", "paws"),
    "Cars": ("drive", "engine", "garage", "roadtrip", "detailing", "tuning"),
    "Study": ("study", "notes", "exam", "library", "reading", "journal"),
    "Travel": ("trip", "beach", "hotel", "flight", "city", "passport"),
}
GENRES = tuple(GENRE_WORDS)
GENRE_FORMATS = ("Clips", "Vlogs", "Shorts", "Stories")  # entertainment L3 = "<genre> <format>"

ADJECTIVES = ("new", "soft", "portable", "lightweight", "durable", "stylish", "compact", "elegant", "cozy",
              "waterproof", "handmade", "organic", "modern", "bright", "quiet", "fresh", "slim", "warm",
              "sturdy", "colorful")
PRICE_BAND_WORDS = ("budget", "value", "everyday", "premium", "luxury")
VIDEO_HOOKS = ("you need this", "honest review", "watch before you buy", "top pick", "daily use",
               "first look", "try on", "worth it", "my favourite", "how to use")
LIVE_HOOKS = ("live deals", "flash sale", "today only", "live showcase", "new arrivals", "warehouse live")

_ONSETS = ("b", "k", "d", "f", "g", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "kr", "tr", "st",
           "pl", "gl")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "io", "ea")
_CODAS = ("", "n", "r", "x", "l", "s", "th", "m")


def made_up_words(rng: np.random.Generator, n: int) -> list[str]:
    """``n`` distinct pronounceable made-up words (brand names, product lines)."""
    out: list[str] = []
    seen: set[str] = set()
    while len(out) < n:
        k = n - len(out)
        syl = rng.integers(2, 4, size=k)
        for s in syl:
            w = "".join(_ONSETS[rng.integers(len(_ONSETS))] + _VOWELS[rng.integers(len(_VOWELS))]
                        for _ in range(s)) + _CODAS[rng.integers(len(_CODAS))]
            if w not in seen:
                seen.add(w)
                out.append(w)
    return out


def product_text(r: random.Random, brand: str, band: int, l3_words: list[str], l2_noun: str, modifier: str,
                 l1_name: str) -> tuple[str, str]:
    """A product's title and description; words come from its L3, L2 and L1 (in that order)."""
    line, line2, finish = r.choice(l3_words), r.choice(l3_words), l3_words[-1]
    adj = r.sample(ADJECTIVES, 3)
    band_word = PRICE_BAND_WORDS[band]
    title_parts = [brand.capitalize(), line.capitalize(), modifier, l2_noun]
    if r.random() < 0.6:
        title_parts.insert(1, band_word)
    if r.random() < 0.7:
        title_parts.insert(-1, adj[0])
    title = " ".join(title_parts)
    desc = (f"The {line} {modifier.lower()} {l2_noun.lower()} by {brand.capitalize()}: {adj[1]}, {adj[2]} "
            f"and made for every {l1_name.lower()} fan. A {band_word} {l2_noun.lower()} from the {line2} line; "
            f"{modifier.lower()} design, {finish} finish.")
    return title, desc


def video_text(r: random.Random, product_title: str, l2_noun: str, l3_words: list[str],
               genre: str) -> tuple[str, str]:
    """An e-commerce short-video's title and OCR/ASR-like text about the product it sells."""
    hook = r.choice(VIDEO_HOOKS)
    gw = r.sample(GENRE_WORDS[genre], 2)
    title = f"{l2_noun} {hook}: {product_title.split(' ', 1)[-1].lower()} #{gw[0]}"
    word = r.choice(l3_words)
    text = (f"OCR: {product_title} | {hook} | {word} ASR: so today I am showing this {l2_noun.lower()}, "
            f"the {word} one, {gw[0]} {gw[1]} style, link below")
    return title, text


def live_text(r: random.Random, brand: str, l1_name: str, l2_noun: str) -> tuple[str, str]:
    hook = r.choice(LIVE_HOOKS)
    title = f"{brand.capitalize()} {hook}: {l2_noun} and more"
    text = f"{brand.capitalize()} official live room. {l1_name} {l2_noun.lower()} {hook}, ask the host anything."
    return title, text


def entertainment_text(r: random.Random, genre: str, fmt: str, creator: str) -> tuple[str, str]:
    w = r.sample(GENRE_WORDS[genre], 4)
    title = f"{w[0]} {w[1]} {fmt.lower()} by {creator}"
    text = f"OCR: {w[0]} {w[2]} ASR: hey everyone, {creator} here, today {w[1]} {w[3]} {genre.lower()}"
    return title, text
