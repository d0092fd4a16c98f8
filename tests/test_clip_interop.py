"""Checkpoint interop (issue 13): OpenAI / open_clip key layouts both ways, TorchScript archives, open_clip training
checkpoints, config inference and export. The reference below re-implements OpenAI's CLIP model (its modules and
parameter names, nn.MultiheadAttention, explicit masks) independently of clip_train, so the features of one set of
generated weights can be compared between the two implementations. (The side-environment script
benchmarks/parity_openclip.py does the same against open_clip itself.)"""

from __future__ import annotations

import gzip
import json
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from clip_train.errors import CheckpointError
from clip_train.interop import (
    config_from_open_clip,
    config_to_open_clip,
    export_open_clip,
    from_open_clip_state_dict,
    infer_config,
    load_any,
    to_open_clip_state_dict,
)
from clip_train.model import CLIP, CLIPConfig, TextConfig, VisionConfig
from clip_train.tokenizer import CLIPTokenizer

CAPTIONS = ["a red circle.", "a photo of a blue square", "two green triangles on grey", "a yellow circle, small",
            "purple square in the corner", "an orange triangle"] * 20


# ----------------------------------------------------------------------------------- reference (OpenAI's layout)
class RefQuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class RefBlock(nn.Module):
    def __init__(self, width, heads, mask=None):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(width, width * 4)), ("gelu", RefQuickGELU()),
                                              ("c_proj", nn.Linear(width * 4, width))]))
        self.ln_2 = nn.LayerNorm(width)
        self.mask = mask

    def forward(self, x):  # (L, N, D), as OpenAI's
        mask = None if self.mask is None else self.mask[: x.shape[0], : x.shape[0]]
        x = x + self.attn(self.ln_1(x), self.ln_1(x), self.ln_1(x), need_weights=False, attn_mask=mask)[0]
        return x + self.mlp(self.ln_2(x))


class RefTransformer(nn.Module):
    def __init__(self, width, layers, heads, mask=None):
        super().__init__()
        self.resblocks = nn.Sequential(*[RefBlock(width, heads, mask) for _ in range(layers)])

    def forward(self, x):
        return self.resblocks(x)


class RefViT(nn.Module):
    def __init__(self, res, patch, width, layers, heads, out):
        super().__init__()
        s = width ** -0.5
        self.conv1 = nn.Conv2d(3, width, patch, patch, bias=False)
        self.class_embedding = nn.Parameter(s * torch.randn(width))
        self.positional_embedding = nn.Parameter(s * torch.randn((res // patch) ** 2 + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = RefTransformer(width, layers, heads)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(s * torch.randn(width, out))

    def forward(self, x):
        x = self.conv1(x).flatten(2).permute(0, 2, 1)
        cls = self.class_embedding + torch.zeros(x.shape[0], 1, x.shape[-1])
        x = torch.cat([cls, x], dim=1) + self.positional_embedding
        x = self.transformer(self.ln_pre(x).permute(1, 0, 2)).permute(1, 0, 2)
        return self.ln_post(x[:, 0, :]) @ self.proj


class RefBottleneck(nn.Module):
    def __init__(self, inplanes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample = None
        if stride > 1 or inplanes != planes * 4:
            self.downsample = nn.Sequential(OrderedDict([("-1", nn.AvgPool2d(stride)), ("0", nn.Conv2d(inplanes, planes * 4, 1, bias=False)),
                                                         ("1", nn.BatchNorm2d(planes * 4))]))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(self.avgpool(out)))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class RefAttnPool(nn.Module):
    def __init__(self, spacial, dim, heads, out):
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(spacial ** 2 + 1, dim) / dim ** 0.5)
        self.k_proj, self.q_proj, self.v_proj = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.c_proj = nn.Linear(dim, out)
        self.num_heads = heads

    def forward(self, x):
        x = x.flatten(start_dim=2).permute(2, 0, 1)
        x = torch.cat([x.mean(dim=0, keepdim=True), x], dim=0) + self.positional_embedding[:, None, :]
        x, _ = F.multi_head_attention_forward(
            query=x[:1], key=x, value=x, embed_dim_to_check=x.shape[-1], num_heads=self.num_heads,
            q_proj_weight=self.q_proj.weight, k_proj_weight=self.k_proj.weight, v_proj_weight=self.v_proj.weight,
            in_proj_weight=None, in_proj_bias=torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias]),
            bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0, out_proj_weight=self.c_proj.weight,
            out_proj_bias=self.c_proj.bias, use_separate_proj_weight=True, training=False, need_weights=False)
        return x.squeeze(0)


class RefResNet(nn.Module):
    def __init__(self, layers, out, heads, res, width):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width // 2, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.conv2 = nn.Conv2d(width // 2, width // 2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.conv3 = nn.Conv2d(width // 2, width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.avgpool = nn.AvgPool2d(2)
        self._inplanes = width
        self.layer1 = self._make(width, layers[0])
        self.layer2 = self._make(width * 2, layers[1], 2)
        self.layer3 = self._make(width * 4, layers[2], 2)
        self.layer4 = self._make(width * 8, layers[3], 2)
        self.attnpool = RefAttnPool(res // 32, width * 32, heads, out)

    def _make(self, planes, blocks, stride=1):
        mods = [RefBottleneck(self._inplanes, planes, stride)]
        self._inplanes = planes * 4
        mods += [RefBottleneck(self._inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*mods)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = self.avgpool(F.relu(self.bn3(self.conv3(x))))
        return self.attnpool(self.layer4(self.layer3(self.layer2(self.layer1(x)))))


class RefCLIP(nn.Module):
    """OpenAI's CLIP (model.py) with QuickGELU, pooled at the highest token id."""

    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        v, t = cfg.vision_cfg, cfg.text_cfg
        if v.type == "vit":
            self.visual = RefViT(v.image_size, v.patch_size, v.width, v.layers, v.heads, cfg.embed_dim)
        else:
            self.visual = RefResNet(v.layers, cfg.embed_dim, v.heads, v.image_size, v.width)
        mask = torch.full((t.context_length, t.context_length), float("-inf")).triu(1)
        self.transformer = RefTransformer(t.width, t.layers, t.heads, mask)
        self.token_embedding = nn.Embedding(t.vocab_size, t.width)
        self.positional_embedding = nn.Parameter(0.01 * torch.randn(t.context_length, t.width))
        self.ln_final = nn.LayerNorm(t.width)
        self.text_projection = nn.Parameter(t.width ** -0.5 * torch.randn(t.width, cfg.embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(2.6592))

    def encode_image(self, image):
        return self.visual(image)

    def encode_text(self, text):
        x = self.token_embedding(text) + self.positional_embedding
        x = self.ln_final(self.transformer(x.permute(1, 0, 2)).permute(1, 0, 2))
        return x[torch.arange(x.shape[0]), text.argmax(dim=-1)] @ self.text_projection

    def forward(self, image, text):
        return self.encode_image(image), self.encode_text(text)


def _randomize(module: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif name.endswith(("bias", "running_mean")) or ".bn" in name or "downsample.1" in name or ".ln_" in name:
                t.add_(0.1 * torch.randn(t.shape, generator=g))


def _vit_cfg(vocab: int) -> CLIPConfig:
    return CLIPConfig(embed_dim=32, vision_cfg=VisionConfig(type="vit", image_size=32, patch_size=8, width=128, layers=2, heads=2),
                      text_cfg=TextConfig(context_length=77, vocab_size=vocab, width=128, heads=2, layers=2), quick_gelu=True)


def _rn_cfg(vocab: int) -> CLIPConfig:
    return CLIPConfig(embed_dim=32, vision_cfg=VisionConfig(type="resnet", image_size=64, width=16, layers=[1, 1, 2, 1], heads=8),
                      text_cfg=TextConfig(context_length=77, vocab_size=vocab, width=128, heads=2, layers=2), quick_gelu=True)


@pytest.fixture(scope="module")
def tokenizer():
    return CLIPTokenizer.train(CAPTIONS, vocab_size=600)


@pytest.fixture(scope="module", params=["vit", "resnet"])
def reference(request, tokenizer):
    cfg = (_vit_cfg if request.param == "vit" else _rn_cfg)(tokenizer.vocab_size)
    torch.manual_seed(0)
    ref = RefCLIP(cfg).eval()
    _randomize(ref, 1)
    return cfg, ref


def _inputs(cfg: CLIPConfig, tokenizer):
    g = torch.Generator().manual_seed(2)
    return torch.randn(3, 3, cfg.vision_cfg.image_size, cfg.vision_cfg.image_size, generator=g), tokenizer(CAPTIONS[:5])


def _assert_features_equal(model: CLIP, ref: RefCLIP, cfg, tokenizer):
    images, texts = _inputs(cfg, tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images), ref.encode_image(images), atol=1e-5, rtol=0)
        torch.testing.assert_close(model.encode_text(texts), ref.encode_text(texts), atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------------------- tests
def test_key_mapping_is_the_reference_layout_both_ways(reference):
    cfg, ref = reference
    ours = CLIP(cfg)
    ref_keys = set(ref.state_dict())
    assert set(to_open_clip_state_dict(ours.state_dict())) == ref_keys
    assert set(from_open_clip_state_dict(ref.state_dict())) == set(ours.state_dict())
    # the architecture is recovered from the shapes alone (OpenAI's rule)
    inferred = infer_config(from_open_clip_state_dict(ref.state_dict()))
    assert inferred.to_dict() == cfg.to_dict()


def test_openai_state_dict_loads_with_identical_features(reference, tokenizer, tmp_path):
    cfg, ref = reference
    state = dict(ref.state_dict())
    state["input_resolution"] = torch.tensor(cfg.vision_cfg.image_size)  # as OpenAI's archives carry
    torch.save(state, tmp_path / "openai.pt")
    tokenizer.save(tmp_path / "tokenizer.json")
    loaded = load_any(str(tmp_path / "openai.pt"))
    assert loaded.format == "openai" and loaded.model.config.quick_gelu
    _assert_features_equal(loaded.model, ref, cfg, tokenizer)
    assert torch.equal(loaded.tokenizer(CAPTIONS[:3]), tokenizer(CAPTIONS[:3]))


@pytest.mark.filterwarnings("ignore")
def test_torchscript_archive_loads(reference, tokenizer, tmp_path):
    cfg, ref = reference
    images, texts = _inputs(cfg, tokenizer)
    traced = torch.jit.trace(ref, (images, texts), check_trace=False)
    traced.save(str(tmp_path / "ViT-openai.pt"))
    tokenizer.save(tmp_path / "tokenizer.json")
    loaded = load_any(str(tmp_path / "ViT-openai.pt"))
    assert loaded.format == "openai-torchscript"
    _assert_features_equal(loaded.model, ref, cfg, tokenizer)


def test_open_clip_training_checkpoint_with_config(reference, tokenizer, tmp_path):
    cfg, ref = reference
    cfg_plain = CLIPConfig.from_dict(cfg.to_dict())
    wrapped = {"epoch": 3, "name": "x", "state_dict": {f"module.{k}": v for k, v in ref.state_dict().items()}}
    torch.save(wrapped, tmp_path / "epoch_3.pt")
    (tmp_path / "epoch_3.json").write_text(json.dumps(config_to_open_clip(cfg_plain)))
    tokenizer.save(tmp_path / "tokenizer.json")
    loaded = load_any(str(tmp_path / "epoch_3.pt"))
    assert loaded.format == "open_clip" and loaded.info["step"] == 3
    assert loaded.model.config.to_dict() == cfg_plain.to_dict()
    _assert_features_equal(loaded.model, ref, cfg, tokenizer)
    # a config that contradicts the weights is a one-line user error, not a crash
    bad = config_to_open_clip(cfg_plain)
    bad["embed_dim"] = 16
    (tmp_path / "epoch_3.json").write_text(json.dumps(bad))
    with pytest.raises(CheckpointError, match="shape|fit"):
        load_any(str(tmp_path / "epoch_3.pt"))


def test_export_run_loads_in_reference_layout(reference, tokenizer, tmp_path):
    """clip_train -> open_clip direction: the exported state dict drops into the reference model (strict) and gives
    the run's features; the exported config reads back as the run's architecture."""
    from clip_train.checkpoint import atomic_write_json, save_checkpoint

    cfg, _ = reference
    cfg = CLIPConfig.from_dict(cfg.to_dict())
    cfg.text_cfg.eot_token_id = tokenizer.eot_token_id
    torch.manual_seed(5)
    model = CLIP(cfg).eval()
    _randomize(model, 6)
    run = tmp_path / "run"
    run.mkdir()
    atomic_write_json(run / "config.json", {"model": "tiny-test", "model_config": cfg.to_dict()})
    save_checkpoint(run / "checkpoint.pt", {"model": model.state_dict(), "step": 7})
    tokenizer.save(run / "tokenizer.json")
    result = export_open_clip(str(run), str(tmp_path / "export"))
    name = result["name"]
    assert name == "clipline-tiny-test" and result["tokenizer_is_clip"] is False
    files = {p.name for p in (tmp_path / "export").iterdir()}
    assert files == {f"{name}.json", f"{name}.pt", f"{name}-tokenizer.json", f"{name}-bpe.txt.gz"}
    oc_cfg = json.loads((tmp_path / "export" / f"{name}.json").read_text())
    assert set(oc_cfg) == {"embed_dim", "quick_gelu", "vision_cfg", "text_cfg"}
    assert oc_cfg["text_cfg"]["tokenizer_kwargs"]["bpe_path"].endswith(f"{name}-bpe.txt.gz")
    back = config_from_open_clip(oc_cfg)
    back.text_cfg.eot_token_id = cfg.text_cfg.eot_token_id
    assert back.to_dict() == cfg.to_dict()
    # The merges file is CLIP's format (a header, one merge per line, no trailing newline: open_clip would read an
    # empty last line as one more merge and shift the special tokens' ids).
    text = gzip.decompress((tmp_path / "export" / f"{name}-bpe.txt.gz").read_bytes()).decode()
    lines = text.split("\n")
    assert lines[0].startswith("#version") and lines[-1] != "" and len(lines) - 1 == len(tokenizer.merges())
    assert CLIPTokenizer.from_clip_merges_file(tmp_path / "export" / f"{name}-bpe.txt.gz").tokenizer.get_vocab() == \
        tokenizer.tokenizer.get_vocab()
    ref = RefCLIP(cfg).eval()
    state = torch.load(tmp_path / "export" / f"{name}.pt", weights_only=True)
    ref.load_state_dict(state, strict=True)
    _assert_features_equal(model, ref, cfg, tokenizer)
    # and clip_train reads its own export back (directory form), with the same tokenizer
    again = load_any(str(tmp_path / "export"))
    assert again.format == "open_clip"
    _assert_features_equal(again.model, ref, cfg, tokenizer)
    assert torch.equal(again.tokenizer(CAPTIONS[:4]), tokenizer(CAPTIONS[:4]))


def test_unsupported_configs_and_missing_tokenizer_are_user_errors(reference, tmp_path):
    cfg, ref = reference
    oc = config_to_open_clip(CLIPConfig.from_dict(cfg.to_dict()))
    oc["vision_cfg"]["attentional_pool"] = True
    with pytest.raises(CheckpointError, match="attentional_pool"):
        config_from_open_clip(oc)
    oc = config_to_open_clip(CLIPConfig.from_dict(cfg.to_dict()))
    oc["text_cfg"]["hf_model_name"] = "roberta-base"
    with pytest.raises(CheckpointError, match="hf_model_name"):
        config_from_open_clip(oc)
    torch.save(ref.state_dict(), tmp_path / "w.pt")
    with pytest.raises(CheckpointError, match="--bpe-merges"):  # CLIP's merges are never downloaded
        load_any(str(tmp_path / "w.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pt"):
        load_any(str(tmp_path / "junk.pt"), bpe="x")
    with pytest.raises(CheckpointError, match="no such"):
        load_any(str(tmp_path / "missing.pt"))


def test_clip_merges_file_reading_skips_open_clip_header(tmp_path, tokenizer):
    """open_clip's copy of CLIP's merges starts with '"bpe_simple_vocab_16e6.txt#version: 0.2': a header, not a merge."""
    merges = tokenizer.merges()
    body = "\n".join(f"{a} {b}" for a, b in merges)
    (tmp_path / "m.txt.gz").write_bytes(gzip.compress(('"bpe_simple_vocab_16e6.txt#version: 0.2\n' + body).encode()))
    read = CLIPTokenizer.from_clip_merges_file(tmp_path / "m.txt.gz")
    assert read.merges() == merges
