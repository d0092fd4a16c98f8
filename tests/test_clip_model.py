"""CLIP model library: configs, encoders, end-token pooling, padding trimming, checkpointing, weight-decay groups,
learning-rate schedule."""

from __future__ import annotations

import math

import pytest
import torch

from clip_train.model import CLIP, CLIPConfig, build_model, list_models, load_config
from clip_train.optim import build_optimizer, build_scheduler, cosine_lr_factor, param_groups


@pytest.fixture(autouse=True)
def one_torch_thread():
    # The suite shares 2 cores with other work: oversubscribed OpenMP threads are many times slower than one.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_config(vision_type: str = "vit") -> CLIPConfig:
    cfg = load_config("tiny")
    cfg.text_cfg.vocab_size, cfg.text_cfg.eot_token_id, cfg.text_cfg.context_length = 50, 49, 16
    cfg.text_cfg.layers, cfg.vision_cfg.layers = 2, 2
    cfg.embed_dim = 32
    if vision_type == "resnet":
        cfg.vision_cfg.type, cfg.vision_cfg.layers, cfg.vision_cfg.width, cfg.vision_cfg.heads = "resnet", [1, 1, 1, 1], 16, 4
    return cfg


def tokens(batch: int, lengths: list[int], ctx: int = 16, eot: int = 49) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    t = torch.zeros(batch, ctx, dtype=torch.long)
    for i, n in enumerate(lengths):
        t[i, 0] = 48
        t[i, 1 : n - 1] = torch.randint(1, 48, (n - 2,), generator=g)
        t[i, n - 1] = eot
    return t


def test_named_configs_exist_and_load():
    assert {"tiny", "RN50", "ViT-B-32", "ViT-B-16"} <= set(list_models())
    assert load_config("ViT-B/32").vision_cfg.patch_size == 32
    assert load_config("RN50").vision_cfg.type == "resnet"
    with pytest.raises(ValueError, match="unknown model"):
        load_config("nope")


@pytest.mark.parametrize("vision", ["vit", "resnet"])
def test_forward_shapes_normalised_and_logit_scale(vision):
    torch.manual_seed(0)
    model = CLIP(small_config(vision)).eval()
    size = model.image_size
    img, txt, scale = model(torch.randn(3, 3, size, size), tokens(3, [5, 9, 16]))
    assert img.shape == txt.shape == (3, 32)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(txt.norm(dim=-1), torch.ones(3))
    assert float(model.logit_scale) == pytest.approx(math.log(1 / 0.07))
    assert float(scale) == pytest.approx(1 / 0.07, rel=1e-5)
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    assert float(model(torch.randn(1, 3, size, size), tokens(1, [4]))[2]) == pytest.approx(100.0)
    model.clamp_logit_scale()
    assert float(model.logit_scale) == pytest.approx(math.log(100.0))


def test_text_pooled_at_end_token_and_padding_trim_is_exact():
    torch.manual_seed(0)
    model = CLIP(small_config()).eval()
    t = tokens(2, [4, 7])
    trimmed = model.encode_text(t)
    model.text.trim_padding = False
    full = model.encode_text(t)
    torch.testing.assert_close(trimmed, full, rtol=1e-5, atol=1e-6)
    # Tokens after the end token do not change the features (causal mask + pooling at the end token).
    t2 = t.clone()
    t2[0, 5:] = 7
    torch.testing.assert_close(model.encode_text(t2)[0], full[0], rtol=1e-5, atol=1e-6)
    # ... while a token before it does.
    t3 = t.clone()
    t3[0, 1] = (t3[0, 1] + 1) % 47 + 1
    assert not torch.allclose(model.encode_text(t3)[0], full[0])


@pytest.mark.parametrize("vision", ["vit", "resnet"])
def test_gradient_checkpointing_gives_same_gradients(vision):
    torch.manual_seed(0)
    cfg = small_config(vision)
    model = CLIP(cfg)
    x, t = torch.randn(2, 3, cfg.vision_cfg.image_size, cfg.vision_cfg.image_size), tokens(2, [5, 8])

    def grads():
        model.zero_grad()
        img, txt, s = model(x, t)
        (s * img @ txt.T).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    model.eval()  # BatchNorm in eval mode so both passes see identical statistics
    plain = grads()
    model.set_grad_checkpointing(True)
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()
    ckpt = grads()
    assert plain.keys() == ckpt.keys()
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-4, atol=1e-6, msg=name)


def test_weight_decay_groups_exclude_gains_biases_embeddings_and_logit_scale():
    for vision in ("vit", "resnet"):
        model = CLIP(small_config(vision))
        decay_group, no_decay_group = param_groups(model, 0.2)
        assert decay_group["weight_decay"] == 0.2 and no_decay_group["weight_decay"] == 0.0
        ids = {id(p): n for n, p in model.named_parameters()}
        decay = {ids[id(p)] for p in decay_group["params"]}
        no_decay = {ids[id(p)] for p in no_decay_group["params"]}
        assert decay.isdisjoint(no_decay) and decay | no_decay == set(ids.values())
        owner = {f"{mod_name}.{pn}".lstrip("."): mod for mod_name, mod in model.named_modules() for pn, _ in mod.named_parameters(recurse=False)}
        for name, param in model.named_parameters():
            module = owner[name]
            is_gain_or_bias = isinstance(module, (torch.nn.LayerNorm, torch.nn.BatchNorm2d)) or name.endswith("bias")
            is_embedding = isinstance(module, torch.nn.Embedding) or "embedding" in name
            should_skip = is_gain_or_bias or is_embedding or name == "logit_scale"
            assert (name in no_decay) == should_skip, name
        for must in ("logit_scale", "text.token_embedding.weight", "text.positional_embedding", "text.ln_final.weight"):
            assert must in no_decay
        if vision == "vit":
            for must in ("visual.class_embedding", "visual.positional_embedding", "visual.transformer.resblocks.0.ln_1.weight",
                         "visual.transformer.resblocks.0.attn.in_proj.bias"):
                assert must in no_decay
            assert {"visual.conv1.weight", "visual.proj", "text.text_projection",
                    "visual.transformer.resblocks.0.mlp.c_fc.weight"} <= decay
        else:
            assert {"visual.bn1.weight", "visual.attnpool.positional_embedding", "visual.layer1.0.bn3.weight"} <= no_decay
            assert {"visual.conv1.weight", "visual.attnpool.q_proj.weight"} <= decay
    opt = build_optimizer(model, lr=1e-3)
    assert opt.defaults["betas"] == (0.9, 0.98) and opt.defaults["eps"] == 1e-6


def test_cosine_schedule_with_linear_warmup():
    base, warmup, total = 0.1, 4, 12
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base)
    sched = build_scheduler(opt, warmup, total)
    seen = []
    for _ in range(total):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expected = [base * (s + 1) / warmup for s in range(warmup)]
    expected += [base * 0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup))) for s in range(warmup, total)]
    assert seen == pytest.approx(expected)
    assert cosine_lr_factor(total, warmup, total) == pytest.approx(0.0)


def test_build_model_by_name():
    model = build_model("tiny")
    assert model.image_size == 64 and model.text.context_length == 77
