"""The stage-1 item encoder: <EMB> pooling, visual tokens, frozen vision, both backbone kinds."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from onemall_pl.models.encoder import EMB_TOKEN, EncoderConfig, ItemEncoder, ItemProcessor

TINY_SWIN = {"embed_dim": 16, "depths": [1, 1], "num_heads": [1, 2], "window_size": 4}
TINY_QWEN = {"model_type": "qwen2", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                 "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 30522, "max_position_embeddings": 128}


def _png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((24, 24, 3), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


ITEMS = [
    {"title": "red running shoe", "text": None, "images": [_png(10)]},  # product: 1 image + title
    {"title": "blue cotton shirt", "text": "asr: soft fabric, ocr: sale", "images": [_png(20 * i) for i in range(9)]},
    {"title": "a video without frames", "text": "talking", "images": None},
]


@pytest.fixture(scope="module")
def minilm():
    cfg = EncoderConfig(max_length=16, vision_kwargs=TINY_SWIN, image_size=32, train_top_layers=2)
    torch.manual_seed(0)
    return ItemEncoder(cfg), ItemProcessor(cfg)


def test_processor_appends_emb_and_caps_frames(minilm):
    enc, proc = minilm
    x = proc(ITEMS)
    emb_id = proc.tokenizer.convert_tokens_to_ids(EMB_TOKEN)
    assert emb_id == enc.emb_token_id and emb_id >= 30522  # a new token, embeddings resized
    last = x["input_ids"].gather(1, (x["attention_mask"].sum(1) - 1)[:, None])[:, 0]
    assert (last == emb_id).all()
    assert x["image_counts"].tolist() == [1, 6, 0]  # video: 6 evenly spaced of 9 frames
    assert x["pixel_values"].shape == (7, 3, 32, 32)
    assert x["input_ids"].shape[1] <= 16


def test_embedding_is_padding_invariant_and_uses_images(minilm):
    enc, proc = minilm
    enc.eval()
    with torch.no_grad():
        together = enc(**proc(ITEMS))
        alone = torch.cat([enc(**proc([it])) for it in ITEMS])
        other_image = enc(**proc([{**ITEMS[0], "images": [_png(200)]}]))
    assert together.shape == (3, enc.backbone.config.hidden_size)
    torch.testing.assert_close(together, alone, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(other_image[0], together[0], atol=1e-3)  # the visual token reaches <EMB>


def test_vision_is_frozen_and_top_layers_train(minilm):
    fresh = ItemEncoder(EncoderConfig(max_length=8, vision_kwargs=TINY_SWIN, image_size=32))
    assert fresh.backbone.training and not fresh.vision.training  # HF loads in eval mode; we train
    enc, _ = minilm
    enc.train()
    assert not enc.vision.training and not any(p.requires_grad for p in enc.vision.parameters())
    assert all(p.requires_grad for p in enc.projector.parameters())
    trainable = {n.split(".")[2] for n, p in enc.backbone.named_parameters() if p.requires_grad}
    assert trainable == {"4", "5"}  # top 2 of 6 blocks; embeddings frozen
    assert not enc.backbone.get_input_embeddings().weight.requires_grad


def test_decoder_llm_backbone_and_grid_tokens():
    """A tiny Qwen2 (random init, built from a config) with MiniLM's tokenizer; 2x2 visual tokens."""
    cfg = EncoderConfig(text_config=TINY_QWEN, max_length=12, vision_kwargs=TINY_SWIN, image_size=32,
                        tokens_per_image=4, projector_hidden=48)
    torch.manual_seed(0)
    enc, proc = ItemEncoder(cfg), ItemProcessor(cfg)
    x = proc(ITEMS)
    z = enc(**x)
    assert z.shape == (3, 32) and torch.isfinite(z).all()
    z.sum().backward()
    assert enc.projector[0].weight.grad is not None and enc.backbone.embed_tokens.weight.grad is not None
    # causal: <EMB> is last, so changing the padding of a batch does not change it
    with torch.no_grad():
        torch.testing.assert_close(enc(**proc(ITEMS[:1])), z[:1].detach(), atol=1e-4, rtol=1e-4)


def test_text_only_encoder():
    enc = ItemEncoder(EncoderConfig(max_length=8, vision_model=None))
    proc = ItemProcessor(EncoderConfig(max_length=8, vision_model=None))
    x = proc(ITEMS)
    assert x["image_counts"].tolist() == [0, 0, 0]
    assert enc(**x).shape == (3, 384)


def test_bad_config_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no such model folder"):
        ItemEncoder(EncoderConfig(text_model=str(tmp_path / "missing_model")))
    with pytest.raises(ValueError, match="square"):
        ItemEncoder(EncoderConfig(text_config=TINY_QWEN, vision_kwargs=TINY_SWIN, image_size=32, tokens_per_image=3))
    with pytest.raises(ValueError, match="train_top_layers"):
        ItemEncoder(EncoderConfig(text_config=TINY_QWEN, vision_model=None, train_top_layers=5))
    with pytest.raises(ValueError, match="vision_model"):
        ItemEncoder(EncoderConfig(text_config=TINY_QWEN, vision_model="no_such_timm_model"))
