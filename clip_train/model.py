"""The CLIP dual encoder (Radford et al. 2021) in plain PyTorch: ViT and modified-ResNet image towers, causal text tower.

Layout and initialisation follow the paper's reference implementation (and open_clip): pre-norm residual blocks,
a class token and learned positions for the ViT, a three-conv stem with anti-aliased (average-pooled) strided
convolutions and attention pooling for the ResNet, a causal text Transformer pooled at the end-of-text token, linear
projections into the joint space and a learnable temperature initialised to log(1/0.07) and clamped at 100.
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from pipelines.core.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
LOGIT_SCALE_INIT = math.log(1 / 0.07)
LOGIT_SCALE_MAX = math.log(100.0)


@dataclass
class VisionConfig:
    type: str = "vit"  # "vit" or "resnet"
    image_size: int = 224
    patch_size: int = 32  # vit only
    width: int = 768  # vit: model width; resnet: stem width (64 for RN50)
    layers: Any = 12  # vit: int; resnet: [3, 4, 6, 3]
    heads: int = 12  # vit: attention heads; resnet: attention-pool heads
    mlp_ratio: float = 4.0
    # Normalisation of the model's preprocessing (None: CLIP's mean/std); set for imported checkpoints that differ.
    image_mean: Any = None
    image_std: Any = None


@dataclass
class TextConfig:
    context_length: int = 77
    vocab_size: int = 49408
    width: int = 512
    heads: int = 8
    layers: int = 12
    mlp_ratio: float = 4.0
    # Pooling position = first occurrence of this id; set from the run's tokenizer.
    eot_token_id: int | None = None


@dataclass
class CLIPConfig:
    embed_dim: int = 512
    vision_cfg: VisionConfig = field(default_factory=VisionConfig)
    text_cfg: TextConfig = field(default_factory=TextConfig)
    quick_gelu: bool = False

    @classmethod
    def from_dict(cls, d: dict) -> "CLIPConfig":
        known = {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu"}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"model config has unknown keys {sorted(unknown)}; expected {sorted(known)}")
        for part, klass in (("vision_cfg", VisionConfig), ("text_cfg", TextConfig)):
            extra = set(d.get(part, {})) - set(klass.__dataclass_fields__)
            if extra:
                raise ConfigError(f"model config {part} has unknown keys {sorted(extra)}; "
                                  f"expected {sorted(klass.__dataclass_fields__)}")
        if "embed_dim" not in d:
            raise ConfigError("model config has no embed_dim")
        return cls(
            embed_dim=int(d["embed_dim"]),
            vision_cfg=VisionConfig(**d.get("vision_cfg", {})),
            text_cfg=TextConfig(**d.get("text_cfg", {})),
            quick_gelu=bool(d.get("quick_gelu", False)),
        )

    def to_dict(self) -> dict:
        return asdict(self)


def list_models() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def load_config(name_or_path: str | Path) -> CLIPConfig:
    """A named config (`tiny`, `RN50`, `ViT-B-32`, `ViT-B-16`; '/' is accepted for '-') or a JSON file (local or
    s3://, read through pipelines.core.storage)."""
    from pipelines.core import storage

    uri = str(name_or_path)
    if not (uri.endswith(".json") and storage.exists(uri)):
        uri = str(CONFIG_DIR / f"{uri.replace('/', '-')}.json")
        if not storage.exists(uri):
            raise ConfigError(f"unknown model {name_or_path!r}: not a JSON file and not one of {list_models()}")
    try:
        data = json.loads(storage.read_bytes(uri))
    except ValueError as exc:
        raise ConfigError(f"{uri}: not a JSON model config ({exc})") from None
    return CLIPConfig.from_dict(data)


class QuickGELU(nn.Module):
    # The activation of OpenAI's released weights; kept for loading those layouts.
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class LayerNorm(nn.LayerNorm):
    # Normalise in float32 even under autocast / half weights, as the reference implementation does.
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        orig = x.dtype
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps).to(orig)


class Attention(nn.Module):
    """Multi-head self-attention through `F.scaled_dot_product_attention` (flash / memory-efficient kernels on GPU)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.in_proj = nn.Linear(width, 3 * width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.in_proj(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], is_causal=causal)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, c))


class ResidualBlock(nn.Module):
    """Pre-norm Transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, act: type[nn.Module]):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.ln_1 = LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln_2 = LayerNorm(width)
        self.mlp = nn.Sequential(
            OrderedDict([("c_fc", nn.Linear(width, hidden)), ("gelu", act()), ("c_proj", nn.Linear(hidden, width))])
        )

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), causal=causal)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float, act: type[nn.Module], causal: bool):
        super().__init__()
        self.width, self.layers, self.causal = width, layers, causal
        self.grad_checkpointing = False
        self.resblocks = nn.ModuleList([ResidualBlock(width, heads, mlp_ratio, act) for _ in range(layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                # Recompute activations in backward: trades ~30% compute for O(layers) less activation memory.
                x = checkpoint(block, x, self.causal, use_reentrant=False)
            else:
                x = block(x, causal=self.causal)
        return x

    def init_weights(self) -> None:
        # CLIP's scheme: residual-branch output projections scaled down with depth.
        proj_std = (self.width**-0.5) * ((2 * self.layers) ** -0.5)
        attn_std = self.width**-0.5
        fc_std = (2 * self.width) ** -0.5
        for block in self.resblocks:
            nn.init.normal_(block.attn.in_proj.weight, std=attn_std)
            nn.init.zeros_(block.attn.in_proj.bias)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.zeros_(block.attn.out_proj.bias)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)


class VisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig, embed_dim: int, act: type[nn.Module]):
        super().__init__()
        if cfg.image_size % cfg.patch_size:
            raise ValueError(f"image_size {cfg.image_size} is not a multiple of patch_size {cfg.patch_size}")
        self.image_size = cfg.image_size
        width = cfg.width
        grid = cfg.image_size // cfg.patch_size
        scale = width**-0.5
        self.conv1 = nn.Conv2d(3, width, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, int(cfg.layers), cfg.heads, cfg.mlp_ratio, act, causal=False)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, embed_dim))
        self.transformer.init_weights()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x).flatten(2).transpose(1, 2)  # (B, grid*grid, width)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x[:, 0]) @ self.proj


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        # All convs have stride 1; a stride > 1 is done by an average pool after the second conv (anti-aliasing).
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.act2 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.act3 = nn.ReLU(inplace=True)
        self.downsample = None
        if stride > 1 or inplanes != planes * self.expansion:
            self.downsample = nn.Sequential(
                OrderedDict(
                    [
                        ("-1", nn.AvgPool2d(stride) if stride > 1 else nn.Identity()),
                        ("0", nn.Conv2d(inplanes, planes * self.expansion, 1, stride=1, bias=False)),
                        ("1", nn.BatchNorm2d(planes * self.expansion)),
                    ]
                )
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.act2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(self.avgpool(out)))
        return self.act3(out + identity)


class AttentionPool2d(nn.Module):
    """Attention pooling: the mean feature (plus a position) queries all spatial features; one output token."""

    def __init__(self, spatial: int, embed_dim: int, heads: int, output_dim: int):
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(spatial * spatial + 1, embed_dim) / embed_dim**0.5)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.c_proj = nn.Linear(embed_dim, output_dim)
        self.heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)  # (B, HW, C)
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1) + self.positional_embedding.to(x.dtype)
        d = c // self.heads

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, -1, self.heads, d).transpose(1, 2)

        q = split(self.q_proj(x[:, :1]))
        out = F.scaled_dot_product_attention(q, split(self.k_proj(x)), split(self.v_proj(x)))
        return self.c_proj(out.transpose(1, 2).reshape(b, c))


class ModifiedResNet(nn.Module):
    """CLIP's ResNet: 3-conv stem + avg pool, anti-aliased strided blocks, attention pooling instead of global pool."""

    def __init__(self, cfg: VisionConfig, embed_dim: int):
        super().__init__()
        layers = list(cfg.layers)
        if len(layers) != 4:
            raise ValueError(f"resnet layers must list 4 stage depths, got {cfg.layers!r}")
        width = cfg.width
        self.image_size = cfg.image_size
        self.conv1 = nn.Conv2d(3, width // 2, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width // 2, width // 2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.act2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(width // 2, width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.act3 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(2)
        self._inplanes = width
        self.layer1 = self._make_layer(width, layers[0])
        self.layer2 = self._make_layer(width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(width * 8, layers[3], stride=2)
        self.grad_checkpointing = False
        feat = width * 32
        self.attnpool = AttentionPool2d(cfg.image_size // 32, feat, cfg.heads, embed_dim)
        self._init_weights()

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        mods = [Bottleneck(self._inplanes, planes, stride)]
        self._inplanes = planes * Bottleneck.expansion
        mods += [Bottleneck(self._inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*mods)

    def _init_weights(self) -> None:
        std = self.attnpool.c_proj.in_features**-0.5
        for lin in (self.attnpool.q_proj, self.attnpool.k_proj, self.attnpool.v_proj, self.attnpool.c_proj):
            nn.init.normal_(lin.weight, std=std)
        # Zero the last BN gain of each residual branch so every block starts as identity (CLIP does this).
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in stage:
                nn.init.zeros_(block.bn3.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.bn2(self.conv2(x)))
        x = self.avgpool(self.act3(self.bn3(self.conv3(x))))
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(stage, x, use_reentrant=False)
            else:
                x = stage(x)
        return self.attnpool(x)


class TextTransformer(nn.Module):
    def __init__(self, cfg: TextConfig, embed_dim: int, act: type[nn.Module]):
        super().__init__()
        self.context_length = cfg.context_length
        self.eot_token_id = cfg.eot_token_id
        self.trim_padding = True
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.width))
        self.transformer = Transformer(cfg.width, cfg.layers, cfg.heads, cfg.mlp_ratio, act, causal=True)
        self.ln_final = LayerNorm(cfg.width)
        self.text_projection = nn.Parameter(torch.empty(cfg.width, embed_dim))
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=cfg.width**-0.5)
        self.transformer.init_weights()

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        if self.eot_token_id is None:
            # OpenAI's vocabulary puts <end_of_text> at the highest id.
            pool = text.argmax(dim=-1)
        else:
            pool = (text == self.eot_token_id).int().argmax(dim=-1)
        if self.trim_padding and text.device.type == "cpu" and not torch.compiler.is_compiling():
            # Attention is causal and we pool at the end token, so positions after the batch's last end token never
            # influence the output: dropping them gives identical features for a fraction of the compute (captions
            # are far shorter than 77 tokens). Only on CPU: on an accelerator the host sync would cost more (the
            # training loader trims its batches itself), and torch.compile prefers static shapes.
            text = text[:, : int(pool.max()) + 1]
        x = self.token_embedding(text) + self.positional_embedding[: text.shape[1]]
        x = self.ln_final(self.transformer(x))
        return x[torch.arange(x.shape[0], device=x.device), pool] @ self.text_projection


class CLIP(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.config = cfg
        act = QuickGELU if cfg.quick_gelu else nn.GELU
        if cfg.vision_cfg.type == "vit":
            self.visual: nn.Module = VisionTransformer(cfg.vision_cfg, cfg.embed_dim, act)
        elif cfg.vision_cfg.type == "resnet":
            self.visual = ModifiedResNet(cfg.vision_cfg, cfg.embed_dim)
        else:
            raise ValueError(f"vision_cfg.type must be 'vit' or 'resnet', got {cfg.vision_cfg.type!r}")
        self.text = TextTransformer(cfg.text_cfg, cfg.embed_dim, act)
        self.logit_scale = nn.Parameter(torch.tensor(LOGIT_SCALE_INIT))

    @property
    def image_size(self) -> int:
        return self.config.vision_cfg.image_size

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.text.transformer.grad_checkpointing = enable
        if isinstance(self.visual, VisionTransformer):
            self.visual.transformer.grad_checkpointing = enable
        else:
            self.visual.grad_checkpointing = enable

    def encode_image(self, image: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        feats = self.visual(image)
        return F.normalize(feats, dim=-1) if normalize else feats

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        feats = self.text(text)
        return F.normalize(feats, dim=-1) if normalize else feats

    def clamp_logit_scale(self) -> None:
        # The paper clips the temperature so logits are scaled by at most 100.
        with torch.no_grad():
            self.logit_scale.clamp_(0, LOGIT_SCALE_MAX)

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Normalised image features, normalised text features, and exp(logit_scale) (at most 100)."""
        return (
            self.encode_image(image, normalize=True),
            self.encode_text(text, normalize=True),
            self.logit_scale.clamp(max=LOGIT_SCALE_MAX).exp(),
        )


def build_model(cfg: CLIPConfig | str | Path) -> CLIP:
    if not isinstance(cfg, CLIPConfig):
        cfg = load_config(cfg)
    return CLIP(cfg)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
