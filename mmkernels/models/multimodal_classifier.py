"""MultimodalClassifier: text, image and audio encoders fused by mmkernels layers, then a head."""
import torch
from torch import nn

from mmkernels.nn import ConcatWeightedFusion, CrossModalAttention


class MultimodalClassifier(nn.Module):
    """A small, configurable three-modality classifier: the shape of model the layers are for.

    text: token ids (B, Lt) with text_padding (B, Lt, True = pad); image: (B, C, H, W), cut into
    patches; audio: frames (B, La, F) with audio_lengths (B,).
    fusion="concat_weighted": the pooled text, image and audio vectors are fused by
    ConcatWeightedFusion (softmax weights over the modalities).
    fusion="cross_attention": text tokens attend to the image patches and audio frames through
    CrossModalAttention (padded audio frames are skipped), then are pooled.
    """

    def __init__(self, num_classes=10, vocab_size=1000, dim=64, num_heads=4, image_channels=3, patch_size=8,
                 audio_features=40, max_text_len=128, fusion="concat_weighted"):
        super().__init__()
        if fusion not in ("concat_weighted", "cross_attention"):
            raise ValueError(f"MultimodalClassifier: fusion must be 'concat_weighted' or 'cross_attention', got {fusion!r}")
        self.fusion_kind = fusion
        self.token = nn.Embedding(vocab_size, dim)
        self.position = nn.Parameter(torch.zeros(max_text_len, dim))
        self.text_encoder = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU())
        self.patches = nn.Conv2d(image_channels, dim, kernel_size=patch_size, stride=patch_size)
        self.audio_encoder = nn.Sequential(nn.Linear(audio_features, dim), nn.GELU())
        if fusion == "concat_weighted":
            self.fusion = ConcatWeightedFusion({"audio": dim, "image": dim, "text": dim})
        else:
            self.fusion = CrossModalAttention(dim, num_heads, batch_first=True)
        self.head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, num_classes))

    def forward(self, text, image, audio, text_padding=None, audio_lengths=None):
        B, Lt = text.shape
        t = self.text_encoder(self.token(text) + self.position[:Lt])
        img = self.patches(image).flatten(2).transpose(1, 2)  # (B, patches, dim)
        aud = self.audio_encoder(audio)
        audio_valid = torch.ones(aud.shape[:2], dtype=torch.bool, device=aud.device)
        if audio_lengths is not None:
            audio_valid = torch.arange(aud.shape[1], device=aud.device) < audio_lengths.view(-1, 1)
        text_valid = ~text_padding if text_padding is not None else torch.ones(B, Lt, dtype=torch.bool, device=t.device)
        if self.fusion_kind == "concat_weighted":
            fused = self.fusion({"text": _mean(t, text_valid), "image": img.mean(1), "audio": _mean(aud, audio_valid)})
        else:
            # image patches, then audio frames with their padding at the end: right padding, so
            # the media lengths are the fast path (no mask, padded key tiles never read)
            media = torch.cat([img, aud], dim=1)
            audio_len = audio_lengths if audio_lengths is not None else torch.full((B,), aud.shape[1], device=aud.device)
            media_lengths = img.shape[1] + audio_len.to(torch.int64)
            attended, _ = self.fusion(t, media, media, kv_lengths=media_lengths, need_weights=False)
            fused = _mean(t + attended, text_valid)
        return self.head(fused)


def _mean(x, valid):
    w = valid.unsqueeze(-1).to(x.dtype)
    return (x * w).sum(1) / w.sum(1).clamp(min=1)
