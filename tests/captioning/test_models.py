"""Shapes and behaviour of the Show, Attend and Tell modules."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cloud.captioning.models import DecoderWithAttention, ModelArgs
from cloud.captioning.vocab import WordMap


def tiny_args(**kw) -> ModelArgs:
    base = dict(vocab_size=20, encoder_proj_dim=16, attention_dim=8, embed_dim=12, decoder_dim=10, dropout=0.0, feature_dropout=0.0)
    return ModelArgs(**{**base, **kw})


@pytest.mark.parametrize("proj", [16, 0])
def test_decoder_forward_shapes_and_padding(proj: int) -> None:
    torch.manual_seed(0)
    decoder = DecoderWithAttention(tiny_args(encoder_proj_dim=proj))
    encoder_out = torch.randn(3, 7, 7, 1280)
    lengths = torch.tensor([5, 9, 7])
    captions = torch.randint(4, 20, (3, 9))
    scores, alphas, decode_lengths = decoder(encoder_out, captions, lengths)
    assert scores.shape == (3, 8, 20)
    assert alphas.shape == (3, 8, 49)
    assert decode_lengths.tolist() == [4, 8, 6]  # input order kept
    assert torch.all(scores[0, 4:] == 0) and torch.all(scores[0, :4] != 0)
    assert torch.allclose(alphas[1].sum(dim=1), torch.ones(8), atol=1e-5)


def test_image_index_shares_features_between_captions() -> None:
    torch.manual_seed(0)
    decoder = DecoderWithAttention(tiny_args())
    feats = torch.randn(2, 49, 1280)
    captions = torch.randint(4, 20, (4, 6))
    lengths = torch.tensor([6, 4, 5, 6])
    image_index = torch.tensor([0, 0, 1, 1])
    shared, _, _ = decoder(feats, captions, lengths, image_index)
    repeated, _, _ = decoder(feats[image_index], captions, lengths)
    assert torch.allclose(shared, repeated, atol=1e-5)


def test_model_args_round_trip_and_unknown_keys() -> None:
    args = tiny_args()
    assert ModelArgs.from_dict(args.to_dict()) == args
    with pytest.raises(ValueError, match="unknown model_args"):
        ModelArgs.from_dict({**args.to_dict(), "bogus": 1})
    with pytest.raises(ValueError, match="unknown encoder"):
        ModelArgs.from_dict({**args.to_dict(), "encoder": "vgg16"})


def test_encoder_grid_and_normalisation(encoder, real_images) -> None:
    x = encoder.preprocess(real_images[:2] + [np.zeros((300, 500, 3), np.uint8)])
    assert x.shape == (3, 3, 224, 224)
    assert float(x.min()) >= -1.0 and float(x.max()) <= 1.0  # EfficientNet-Lite wants [-1, 1]
    assert float(x[2].max()) == -1.0  # black -> -1
    with torch.inference_mode():
        out = encoder(x)
    assert out.shape == (3, 7, 7, 1280)
    assert not any(p.requires_grad for p in encoder.parameters())
    with pytest.raises(ValueError, match="RGB uint8"):
        encoder.preprocess([np.zeros((10, 10), np.uint8)])


def test_word_map_encode_decode() -> None:
    wm = WordMap.build([["a", "dog", "runs"], ["a", "dog"]], min_word_freq=2)
    assert len(wm) == 6 and wm.pad == 0
    enc = wm.encode(["a", "cat", "dog"], max_len=50)
    assert enc == [wm.start, wm["a"], wm.unk, wm["dog"], wm.end]
    assert wm.decode(enc + [wm.pad]) == ["a", "<unk>", "dog"]
    assert wm.encode(["a"] * 10, max_len=3) == [wm.start, wm["a"], wm["a"], wm["a"], wm.end]


def test_encoder_fine_tune_from_block_and_frozen_batch_norm() -> None:
    from cloud.captioning.models import Encoder

    enc = Encoder("efficientnet_lite0", encoded_image_size=5, fine_tune_from=14, pretrained=False)
    trainable = {n.split(".")[1] for n, p in enc.named_parameters() if p.requires_grad}
    assert trainable == {"_blocks", "_conv_head", "_bn1"}
    enc.train()
    assert enc.backbone.training  # fine-tuned: batch norm trains
    frozen = Encoder("efficientnet_lite0", pretrained=False).train()
    assert not frozen.backbone.training  # frozen: batch norm keeps its ImageNet statistics
    with torch.inference_mode():
        assert enc(torch.zeros(1, 3, 224, 224)).shape == (1, 5, 5, 1280)
