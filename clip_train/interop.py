"""Checkpoints of the CLIP ecosystem in and out: OpenAI's CLIP and open_clip, ViT and ModifiedResNet.

Key layouts. OpenAI's released models (TorchScript archives, or their state dicts) and open_clip's ``CLIP`` class share
one layout: the text tower at the top level (``token_embedding``, ``positional_embedding``, ``transformer.*``,
``ln_final``, ``text_projection``), the image tower under ``visual.*``, attention as ``nn.MultiheadAttention``
(``attn.in_proj_weight`` / ``attn.in_proj_bias`` / ``attn.out_proj.*``) and ``logit_scale``. clip_train keeps the
same modules and names except that the text tower lives under ``text.`` and attention's packed projection is a
``Linear`` (``attn.in_proj.weight`` / ``.bias``); the tensors are identical, so conversion is a renaming.
open_clip's ``CustomTextCLIP`` layout (text tower under ``text.``) is read too. Training checkpoints of open_clip
(``{"state_dict": ..., "epoch": ...}``, keys prefixed ``module.`` under DDP) are unwrapped.

Model configs. A checkpoint's architecture comes from (in order) a config given by the caller, a JSON beside it
(``NAME.json`` for ``NAME.pt``, or ``open_clip_config.json``), or the tensor shapes (OpenAI's ``build_model`` rule:
64-wide attention heads). OpenAI's models use QuickGELU: TorchScript archives and state dicts that carry
``input_resolution`` are taken as OpenAI's; any other checkpoint without a config is assumed to use QuickGELU too
(open_clip's naming for OpenAI weights) unless the caller says otherwise, and the loader reports that it guessed.

Tokenizers. A clipline run carries its own tokenizer.json. An exported model carries ``NAME-tokenizer.json`` and,
when its tokenizer is not CLIP's, ``NAME-bpe.txt.gz`` named in the config's ``text_cfg.tokenizer_kwargs.bpe_path``
(what open_clip's ``get_tokenizer`` reads). OpenAI / open_clip models use CLIP's merges file
(``bpe_simple_vocab_16e6.txt.gz``), which clipline does not ship and never downloads: it is looked for beside the
checkpoint, then in ``$CLIPLINE_CLIP_BPE``, or given by the caller (``--bpe-merges``).

Nothing here downloads anything.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import zipfile
from dataclasses import dataclass, field
from typing import Any

import torch

from clip_train.errors import CheckpointError
from clip_train.model import CLIP, CLIPConfig, TextConfig, VisionConfig, load_config
from clip_train.tokenizer import CLIPTokenizer
from clip_train.transforms import EvalTransform, eval_transform_for
from pipelines.core import storage

CLIP_BPE_NAME = "bpe_simple_vocab_16e6.txt.gz"
CLIP_BPE_ENV = "CLIPLINE_CLIP_BPE"
OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")
_TEXT_TOP_LEVEL = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection")
WEIGHT_NAMES = ("open_clip_pytorch_model.bin", "open_clip_model.safetensors", "pytorch_model.bin")


# ------------------------------------------------------------------------------------------------- key mapping
def to_open_clip_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """clip_train state dict -> open_clip's (and OpenAI's) key layout (same tensors)."""
    out = {}
    for key, value in state.items():
        new = key[len("text."):] if key.startswith("text.") else key
        new = new.replace(".attn.in_proj.weight", ".attn.in_proj_weight").replace(".attn.in_proj.bias", ".attn.in_proj_bias")
        out[new] = value
    return out


def from_open_clip_state_dict(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """open_clip / OpenAI state dict (CLIP or CustomTextCLIP layout, optionally ``module.``-prefixed) -> clip_train's."""
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    unsupported = [k for k in state if k.startswith(("logit_bias", "text.transformer.embeddings", "visual.trunk",
                                                     "text.auto_model", "visual.attn_pool"))]
    if unsupported:
        raise CheckpointError(f"unsupported architecture (keys such as {unsupported[0]!r}): clipline loads CLIP "
                              f"ViT and ModifiedResNet models with CLIP's text Transformer")
    out = {}
    for key, value in state.items():
        if key in OPENAI_EXTRA_KEYS or key.endswith("attn_mask"):
            continue
        new = key
        if key.startswith(_TEXT_TOP_LEVEL):
            new = "text." + key
        new = new.replace(".attn.in_proj_weight", ".attn.in_proj.weight").replace(".attn.in_proj_bias", ".attn.in_proj.bias")
        out[new] = value
    return out


def _count(state: dict, prefix: str, suffix: str) -> int:
    return len({k[len(prefix):].split(".")[0] for k in state if k.startswith(prefix) and k.endswith(suffix)})


def infer_config(state: dict[str, torch.Tensor], quick_gelu: bool = True) -> CLIPConfig:
    """Architecture from a clip_train-layout state dict's shapes (OpenAI's build_model rule: 64-wide heads)."""
    try:
        text_width = state["text.ln_final.weight"].shape[0]
        text = TextConfig(
            context_length=state["text.positional_embedding"].shape[0],
            vocab_size=state["text.token_embedding.weight"].shape[0],
            width=text_width,
            heads=max(1, text_width // 64),
            layers=_count(state, "text.transformer.resblocks.", ".attn.in_proj.weight"),
            mlp_ratio=state["text.transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / text_width,
        )
        embed_dim = state["text.text_projection"].shape[1]
        if "visual.proj" in state:
            width = state["visual.conv1.weight"].shape[0]
            patch = state["visual.conv1.weight"].shape[-1]
            grid = round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5)
            vision = VisionConfig(
                type="vit", image_size=patch * grid, patch_size=patch, width=width,
                layers=_count(state, "visual.transformer.resblocks.", ".attn.in_proj.weight"), heads=max(1, width // 64),
                mlp_ratio=state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / width,
            )
        elif "visual.attnpool.c_proj.weight" in state:
            layers = [_count(state, f"visual.layer{b}.", ".conv1.weight") for b in (1, 2, 3, 4)]
            width = state["visual.layer1.0.conv1.weight"].shape[0]
            spatial = round((state["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5)
            vision = VisionConfig(type="resnet", image_size=spatial * 32, width=width, layers=layers,
                                  heads=width * 32 // 64)
        else:
            raise CheckpointError("state dict has neither visual.proj (ViT) nor visual.attnpool (ModifiedResNet)")
    except KeyError as exc:
        raise CheckpointError(f"not a CLIP state dict: missing {exc.args[0]!r}") from None
    return CLIPConfig(embed_dim=embed_dim, vision_cfg=vision, text_cfg=text, quick_gelu=quick_gelu)


# --------------------------------------------------------------------------------------------- config mapping
_VISION_DEFAULTS = {"ls_init_value": None, "patch_dropout": 0.0, "attentional_pool": False, "no_ln_pre": False,
                    "pos_embed_type": "learnable", "final_ln_after_pool": False, "pool_type": "tok",
                    "output_tokens": False, "act_kwargs": None, "norm_kwargs": None, "block_type": None,
                    "qk_norm": False, "scaled_cosine_attn": False, "scale_heads": False, "scale_attn_inner": False,
                    "scale_attn": False, "scale_fc": False, "timm_model_name": None}
_VISION_IGNORED = {"patch_dropout", "attn_pooler_queries", "attn_pooler_heads", "timm_model_pretrained", "timm_pool",
                   "timm_proj", "timm_proj_bias", "timm_drop", "timm_drop_path", "output_tokens"}
_TEXT_DEFAULTS = {"hf_tokenizer_name": None, "hf_model_name": None, "ls_init_value": None, "embed_cls": False,
                  "no_causal_mask": False, "final_ln_after_pool": False, "pool_type": "argmax", "proj_bias": False,
                  "proj_type": "linear", "act_kwargs": None, "norm_kwargs": None, "block_type": None,
                  "qk_norm": False, "scaled_cosine_attn": False, "scale_heads": False, "scale_attn_inner": False,
                  "scale_attn": False, "scale_fc": False}
_TEXT_IGNORED = {"tokenizer_kwargs", "tokenizer_mode", "pad_id", "eos_id", "output_tokens", "hf_model_pretrained",
                 "hf_proj_type", "hf_pooler_type"}


def _check_supported(cfg: dict, defaults: dict, ignored: set, known: set, where: str) -> None:
    for key, value in cfg.items():
        if key in known or key in ignored:
            continue
        if key not in defaults:
            raise CheckpointError(f"open_clip config {where}.{key}: unknown option")
        if value != defaults[key] and not (key == "pool_type" and where == "text_cfg" and value in ("argmax", "eos")):
            raise CheckpointError(f"open_clip config {where}.{key}={value!r}: not supported by clip_train "
                                  f"(only CLIP's ViT / ModifiedResNet with CLIP's text Transformer)")


def config_from_open_clip(d: dict) -> CLIPConfig:
    """An open_clip model config (``{"embed_dim", "vision_cfg", "text_cfg", "quick_gelu"?}``) as a CLIPConfig."""
    if "model_cfg" in d:  # open_clip_config.json of a hub/local-dir export
        d = d["model_cfg"]
    if not all(k in d for k in ("embed_dim", "vision_cfg", "text_cfg")):
        raise CheckpointError("open_clip model config needs embed_dim, vision_cfg and text_cfg")
    extra = set(d) - {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "custom_text", "cast_dtype",
                      "init_logit_scale", "init_logit_bias", "preprocess_cfg"}
    if extra or d.get("init_logit_bias") is not None:
        raise CheckpointError(f"open_clip config keys not supported by clip_train: {sorted(extra) or ['init_logit_bias']}")
    v, t = dict(d["vision_cfg"]), dict(d["text_cfg"])
    _check_supported(v, _VISION_DEFAULTS, _VISION_IGNORED,
                     {"layers", "width", "head_width", "mlp_ratio", "patch_size", "image_size", "image_mean",
                      "image_std", "interpolation", "resize_mode"}, "vision_cfg")
    _check_supported(t, _TEXT_DEFAULTS, _TEXT_IGNORED,
                     {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio"}, "text_cfg")
    image_size = v.get("image_size", 224)
    if isinstance(image_size, (list, tuple)):
        if len(set(image_size)) != 1:
            raise CheckpointError(f"open_clip config vision_cfg.image_size={image_size}: only square images")
        image_size = image_size[0]
    layers = v.get("layers", 12)
    width = int(v.get("width", 768))
    head_width = int(v.get("head_width", 64))
    pp = d.get("preprocess_cfg") or {}
    mean = v.get("image_mean") or pp.get("mean")
    std = v.get("image_std") or pp.get("std")
    if isinstance(layers, (list, tuple)):
        vision = VisionConfig(type="resnet", image_size=int(image_size), width=width, layers=[int(x) for x in layers],
                              heads=width * 32 // head_width, image_mean=mean, image_std=std)
    else:
        vision = VisionConfig(type="vit", image_size=int(image_size), patch_size=int(v.get("patch_size", 16)),
                              width=width, layers=int(layers), heads=width // head_width,
                              mlp_ratio=float(v.get("mlp_ratio", 4.0)), image_mean=mean, image_std=std)
    text = TextConfig(context_length=int(t.get("context_length", 77)), vocab_size=int(t.get("vocab_size", 49408)),
                      width=int(t.get("width", 512)), heads=int(t.get("heads", 8)), layers=int(t.get("layers", 12)),
                      mlp_ratio=float(t.get("mlp_ratio", 4.0)))
    return CLIPConfig(embed_dim=int(d["embed_dim"]), vision_cfg=vision, text_cfg=text,
                      quick_gelu=bool(d.get("quick_gelu", False)))


def config_to_open_clip(cfg: CLIPConfig) -> dict:
    """A CLIPConfig as an open_clip model config (what ``open_clip.add_model_config`` registers)."""
    v, t = cfg.vision_cfg, cfg.text_cfg
    if v.type == "vit":
        if v.width % v.heads:
            raise CheckpointError(f"vision width {v.width} is not divisible by heads {v.heads}")
        vision = {"image_size": v.image_size, "layers": int(v.layers), "width": v.width,
                  "head_width": v.width // v.heads, "patch_size": v.patch_size, "mlp_ratio": v.mlp_ratio}
    else:
        vision = {"image_size": v.image_size, "layers": [int(x) for x in v.layers], "width": v.width,
                  "head_width": v.width * 32 // v.heads, "patch_size": None}
    if v.image_mean is not None:
        vision["image_mean"] = list(v.image_mean)
    if v.image_std is not None:
        vision["image_std"] = list(v.image_std)
    text = {"context_length": t.context_length, "vocab_size": t.vocab_size, "width": t.width, "heads": t.heads,
            "layers": t.layers, "mlp_ratio": t.mlp_ratio}
    return {"embed_dim": cfg.embed_dim, "quick_gelu": cfg.quick_gelu, "vision_cfg": vision, "text_cfg": text}


# ------------------------------------------------------------------------------------------------- loading
@dataclass
class LoadedModel:
    """A model ready for evaluation/scoring with its tokenizer and preprocessing, and where it came from."""

    model: CLIP
    tokenizer: CLIPTokenizer
    transform: EvalTransform
    format: str  # "clipline-run", "open_clip", "openai-torchscript", "openai"
    path: str
    files: list[str] = field(default_factory=list)  # the files that define the model (for fingerprints)
    info: dict = field(default_factory=dict)  # model name, step, notes

    def fingerprint(self) -> str:
        """sha256 over the content hashes of the defining files (a rename or a move keeps it)."""
        return fingerprint_files(self.files)


def fingerprint_files(files: list[str]) -> str:
    h = hashlib.sha256()
    for uri in sorted(files, key=storage.basename):
        h.update(storage.basename(uri).encode() + b"\0" + storage.sha256_of(uri).encode() + b"\n")
    return h.hexdigest()


def _is_torchscript(data: bytes) -> bool:
    if not data.startswith(b"PK"):
        return False
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            names = zf.namelist()
    except zipfile.BadZipFile:
        return False
    return any(n.endswith("/constants.pkl") for n in names) or any("/code/" in n for n in names)


def _read_weights(uri: str) -> tuple[dict, str, dict]:
    """(state dict in the file's own layout, kind, extra) for a .pt/.bin/.safetensors/TorchScript file."""
    if uri.endswith(".safetensors"):
        try:
            from safetensors.torch import load as load_safetensors
        except ImportError:
            raise CheckpointError(f"{uri}: reading .safetensors needs the safetensors package") from None
        return dict(load_safetensors(storage.read_bytes(uri))), "state_dict", {}
    data = storage.read_bytes(uri)
    if _is_torchscript(data):
        module = torch.jit.load(io.BytesIO(data), map_location="cpu")
        return {k: v for k, v in module.state_dict().items()}, "openai-torchscript", {}
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a file that is no checkpoint
        raise CheckpointError(f"{uri}: not a checkpoint torch can load safely ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        return obj["state_dict"], "open_clip-train", {"epoch": obj.get("epoch"), "name": obj.get("name")}
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict) and "model_config" in obj:
        return obj["model"], "clipline-checkpoint", {"model_config": obj["model_config"], "step": obj.get("step"),
                                                      "model_name": obj.get("model_name")}
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj, "state_dict", {}
    raise CheckpointError(f"{uri}: a torch file, but not a state dict, an open_clip checkpoint or a TorchScript model")


def _stem(uri: str) -> str:
    name = storage.basename(uri)
    for ext in (".safetensors", ".pt", ".pth", ".bin", ".ckpt"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


def _find_beside(directory: str, names: list[str]) -> str | None:
    for name in names:
        uri = storage.join(directory, name)
        if storage.exists(uri):
            return uri
    return None


def _load_config_file(uri: str) -> tuple[CLIPConfig, dict]:
    try:
        raw = json.loads(storage.read_bytes(uri))
    except ValueError as exc:
        raise CheckpointError(f"{uri}: not a JSON model config ({exc})") from None
    if isinstance(raw, dict) and "model_config" in raw:  # a clipline run's config.json
        return CLIPConfig.from_dict(raw["model_config"]), raw
    if isinstance(raw, dict) and isinstance(raw.get("vision_cfg"), dict) and "type" in raw["vision_cfg"]:
        return CLIPConfig.from_dict(raw), raw  # clip_train's own config format
    if not isinstance(raw, dict):
        raise CheckpointError(f"{uri}: expected a JSON object")
    return config_from_open_clip(raw), raw.get("model_cfg", raw)


def _resolve_config(model_config: str | dict | CLIPConfig | None) -> tuple[CLIPConfig | None, dict | None, str | None]:
    if model_config is None:
        return None, None, None
    if isinstance(model_config, CLIPConfig):
        return model_config, None, None
    if isinstance(model_config, dict):
        try:
            return CLIPConfig.from_dict(model_config), model_config, None
        except ValueError:
            return config_from_open_clip(model_config), model_config, None
    if str(model_config).endswith(".json"):
        cfg, raw = _load_config_file(str(model_config))
        return cfg, raw, str(model_config)
    return load_config(str(model_config)), None, None


def _tokenizer_for(path_dir: str, stem: str | None, raw_cfg: dict | None, cfg_dir: str | None, bpe: str | None,
                   context_length: int, files: list[str]) -> tuple[CLIPTokenizer, str]:
    """The tokenizer of a foreign checkpoint and where it came from (see the module docstring)."""
    if bpe:
        files.append(str(bpe))
        return CLIPTokenizer.from_clip_merges_file(bpe, context_length=context_length), str(bpe)
    kwargs = ((raw_cfg or {}).get("text_cfg") or {}).get("tokenizer_kwargs") or {}
    if kwargs.get("bpe_path"):
        p = str(kwargs["bpe_path"])
        candidates = [p] if (storage.is_s3(p) or os.path.isabs(p)) else [p, storage.join(cfg_dir or path_dir, p)]
        # An exported directory that was moved: its merges file is still beside the config.
        candidates.append(storage.join(cfg_dir or path_dir, storage.basename(p)))
        for c in candidates:
            if storage.exists(c):
                files.append(c)
                return CLIPTokenizer.from_clip_merges_file(c, context_length=context_length), c
        raise CheckpointError(f"the model config names tokenizer merges {p}, which do not exist")
    names = ([f"{stem}-tokenizer.json"] if stem else []) + ["tokenizer.json"]
    found = _find_beside(path_dir, names)
    if found and json.loads(storage.read_bytes(found)).get("model", {}).get("type") == "BPE":
        files.append(found)
        tok = CLIPTokenizer.load(found)
        tok.context_length = context_length
        return tok, found
    found = _find_beside(path_dir, [CLIP_BPE_NAME, "bpe_simple_vocab_16e6.txt"])
    if found is None and os.environ.get(CLIP_BPE_ENV):
        found = os.environ[CLIP_BPE_ENV]
        if not storage.exists(found):
            raise CheckpointError(f"${CLIP_BPE_ENV}={found}: no such file")
    if found is None:
        raise CheckpointError(f"{path_dir}: this checkpoint uses CLIP's tokenizer, whose merges file clipline does "
                              f"not ship: pass --bpe-merges PATH/{CLIP_BPE_NAME} (open_clip and OpenAI's clip package "
                              f"include it), put it beside the checkpoint, or set ${CLIP_BPE_ENV}")
    files.append(found)
    return CLIPTokenizer.from_clip_merges_file(found, context_length=context_length), found


def load_any(path: str, device: str | torch.device = "cpu", model_config: str | dict | CLIPConfig | None = None,
             bpe: str | None = None, quick_gelu: bool | None = None) -> LoadedModel:
    """Load a clipline run directory, an open_clip checkpoint (+ config) or an OpenAI state dict / TorchScript file.

    ``path``: a run directory (config.json + checkpoint.pt + tokenizer.json), a directory holding one exported model
    (NAME.json + NAME.pt) or open_clip's hub layout (open_clip_config.json + open_clip_pytorch_model.bin), or a
    weights file (.pt/.pth/.bin/.safetensors, or a TorchScript archive). ``model_config``: a JSON file (open_clip's
    or clip_train's format), a dict, or a clip_train config name, overriding what is found beside the weights.
    ``bpe``: a CLIP-format merges file for the tokenizer. ``quick_gelu``: overrides the activation when no config
    says it.
    """
    from clip_train import checkpoint as run_ckpt

    path = str(path).rstrip("/") if not str(path).endswith("://") else str(path)
    if not storage.exists(path) and not _dir_exists(path):
        raise CheckpointError(f"{path}: no such checkpoint file or directory")
    if _dir_exists(path):
        if run_ckpt.is_run_dir(path) and model_config is None:
            model, tokenizer, config = run_ckpt.load_model(path, device)
            files = [storage.join(path, n) for n in run_ckpt.RUN_FILES]
            return LoadedModel(model, tokenizer, eval_transform_for(model), "clipline-run", path, files,
                               {"model": config.get("model"), "step": config.get("step"), "config": config})
        weights = _find_beside(path, list(WEIGHT_NAMES))
        if weights is None:
            exported = sorted(u for u in storage.list_prefix(path)
                              if u.endswith((".pt", ".pth", ".bin", ".safetensors")) and storage.parent(u) == path)
            if len(exported) != 1:
                raise CheckpointError(f"{path}: not a clipline run (config.json + checkpoint.pt) and not a directory "
                                      f"with exactly one weights file (found {len(exported)})")
            weights = exported[0]
        path = weights
    return _load_weights_file(path, device, model_config, bpe, quick_gelu)


def _dir_exists(uri: str) -> bool:
    if storage.is_s3(uri):
        try:
            return bool(storage.list_prefix(uri))
        except Exception:  # noqa: BLE001 - a missing bucket or prefix is "no directory"
            return False
    return os.path.isdir(uri)


def _load_weights_file(uri: str, device, model_config, bpe, quick_gelu) -> LoadedModel:
    directory, stem = storage.parent(uri) or ".", _stem(uri)
    state, kind, extra = _read_weights(uri)
    files = [uri]
    notes: list[str] = []
    if kind == "clipline-checkpoint":  # a run's checkpoint.pt given as a file
        cfg = CLIPConfig.from_dict(extra["model_config"])
        tok_uri = storage.join(directory, "tokenizer.json")
        if not storage.exists(tok_uri) and bpe is None:
            raise CheckpointError(f"{uri}: a clipline checkpoint without its tokenizer.json beside it")
        if bpe is None:
            files.append(tok_uri)
            tokenizer = CLIPTokenizer.load(tok_uri)
        else:
            tokenizer = CLIPTokenizer.from_clip_merges_file(bpe, context_length=cfg.text_cfg.context_length)
        model = CLIP(cfg)
        _load_state(model, state, uri)
        return LoadedModel(model.to(device).eval(), tokenizer, eval_transform_for(model), "clipline-run", uri, files,
                           {"model": extra.get("model_name"), "step": extra.get("step")})
    openai = kind == "openai-torchscript" or any(k in state for k in OPENAI_EXTRA_KEYS)
    mapped = from_open_clip_state_dict(state)
    cfg, raw, cfg_uri = _resolve_config(model_config)
    if cfg is None:
        cfg_uri = _find_beside(directory, [f"{stem}.json", "open_clip_config.json"])
        if cfg_uri is not None:
            cfg, raw = _load_config_file(cfg_uri)
    if cfg_uri:
        files.append(cfg_uri)
    if cfg is None:
        guess = True if quick_gelu is None else quick_gelu
        cfg = infer_config(mapped, quick_gelu=guess)
        if not openai and quick_gelu is None:
            notes.append("no model config found: architecture inferred from the weights, QuickGELU assumed "
                         "(as OpenAI's models); pass a config to override")
            print(f"clip_train.interop: {uri}: {notes[-1]}", file=sys.stderr)
    elif quick_gelu is not None:
        cfg.quick_gelu = quick_gelu
    model = CLIP(cfg)
    _load_state(model, mapped, uri)
    model.text.eot_token_id = None  # pool at the highest id, as OpenAI / open_clip (CLIP's <end_of_text>)
    tokenizer, tok_source = _tokenizer_for(directory, stem, raw, storage.parent(cfg_uri) if cfg_uri else None, bpe,
                                           cfg.text_cfg.context_length, files)
    if tokenizer.vocab_size > cfg.text_cfg.vocab_size:
        raise CheckpointError(f"tokenizer {tok_source} has {tokenizer.vocab_size} tokens, the model's embedding only "
                              f"{cfg.text_cfg.vocab_size}")
    fmt = "openai-torchscript" if kind == "openai-torchscript" else ("openai" if openai else "open_clip")
    return LoadedModel(model.to(device).eval(), tokenizer, eval_transform_for(model), fmt, uri, files,
                       {"model": stem, "step": extra.get("epoch"), "tokenizer": tok_source, "notes": notes})


def _load_state(model: CLIP, state: dict, uri: str) -> None:
    ours = model.state_dict()
    missing = sorted(set(ours) - set(state))
    unexpected = sorted(set(state) - set(ours))
    if missing or unexpected:
        raise CheckpointError(f"{uri}: weights do not fit the model config ({len(missing)} missing, e.g. "
                              f"{missing[:2]}; {len(unexpected)} unexpected, e.g. {unexpected[:2]})")
    for k, v in state.items():
        if tuple(v.shape) != tuple(ours[k].shape):
            raise CheckpointError(f"{uri}: {k} has shape {tuple(v.shape)}, the model config expects {tuple(ours[k].shape)}")
    model.load_state_dict({k: v.float() for k, v in state.items()})


# ------------------------------------------------------------------------------------------------- export
def export_open_clip(checkpoint: str, out_dir: str, name: str | None = None, **load_kwargs) -> dict:
    """Write ``OUT/NAME.json`` (open_clip model config) and ``OUT/NAME.pt`` (state dict in open_clip's layout), plus
    ``NAME-tokenizer.json`` always and ``NAME-bpe.txt.gz`` when the tokenizer is not CLIP's (named in the config's
    ``text_cfg.tokenizer_kwargs.bpe_path``, so ``open_clip.get_tokenizer(NAME)`` builds the same tokenizer).

    Load in open_clip with ``open_clip.add_model_config(OUT)`` and
    ``open_clip.create_model_and_transforms(NAME, pretrained="OUT/NAME.pt")``. Returns the written files.
    """
    loaded = load_any(checkpoint, "cpu", **load_kwargs)
    model, tokenizer = loaded.model, loaded.tokenizer
    if name is None:
        base = str(loaded.info.get("model") or "model").replace("/", "-")
        name = base if base.startswith("clipline-") else f"clipline-{base}"
    if not name or any(c in name for c in "/\\") or name.startswith("."):
        raise CheckpointError(f"--name {name!r}: expected a plain file name")
    cfg = config_to_open_clip(model.config)
    files: dict[str, str] = {}
    if not tokenizer.is_clip():
        try:
            merges = tokenizer.clip_merges_file_bytes()
        except ValueError as exc:
            raise CheckpointError(f"{checkpoint}: {exc}") from None
        bpe_uri = storage.join(out_dir, f"{name}-bpe.txt.gz")
        storage.write_bytes_atomic(bpe_uri, merges)
        files["bpe"] = bpe_uri
        # open_clip opens bpe_path relative to the working directory: name the file absolutely when it is local.
        cfg["text_cfg"]["tokenizer_kwargs"] = {"bpe_path": bpe_uri if storage.is_s3(bpe_uri) else os.path.abspath(bpe_uri)}
    if tokenizer.context_length != cfg["text_cfg"]["context_length"]:
        raise CheckpointError(f"tokenizer context {tokenizer.context_length} differs from the model's "
                              f"{cfg['text_cfg']['context_length']}")
    tok_uri = storage.join(out_dir, f"{name}-tokenizer.json")
    tokenizer.save(tok_uri)
    files["tokenizer"] = tok_uri
    state = {k: v.detach().float().cpu().contiguous() for k, v in to_open_clip_state_dict(model.state_dict()).items()}
    pt_uri = storage.join(out_dir, f"{name}.pt")
    storage.write_stream_atomic(pt_uri, lambda f: torch.save(state, f))
    files["weights"] = pt_uri
    cfg_uri = storage.join(out_dir, f"{name}.json")
    storage.write_bytes_atomic(cfg_uri, (json.dumps(cfg, indent=2) + "\n").encode())
    files["config"] = cfg_uri
    return {"name": name, "files": files, "source_format": loaded.format, "source": loaded.path,
            "tokenizer_is_clip": tokenizer.is_clip()}
