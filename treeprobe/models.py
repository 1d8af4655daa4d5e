"""open_clip model factory: local checkpoints, ``hf-hub:`` ids, pretrained tags, random init.

:func:`load_model` returns a :class:`LoadedModel` holding the open_clip model (eval
mode), its inference image transform (PIL image → float tensor (3, H, W)), the
architecture name, the embedding width and a digest that identifies the weights
(sha256 of the checkpoint file bytes) for caching and reports.

Architecture and weights are resolved in this order:

1. ``ckpt`` is a local file (torch checkpoint or ``.safetensors``). Its architecture comes
   from the checkpoint's ``model_cfg`` (an open_clip config dict), else its
   ``model_name``, else the ``model`` argument. Weights load strictly.
2. ``ckpt`` or ``model`` is ``hf-hub:org/repo``: config and weights from the Hugging Face
   hub via open_clip's downloaders (works offline when they are in the local HF cache).
3. ``model`` + ``pretrained`` tag (``ViT-B-32`` + ``openai``): open_clip's own path.
4. ``model`` alone: random initialisation (seeded, so the digest ``random-init-<name>``
   always names the same weights).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import pickle
import socket
import tempfile
import threading
import warnings
from dataclasses import dataclass
from typing import Callable
from urllib.parse import urlparse

import torch

from treeprobe.errors import TreeprobeError

PRECISIONS = ("fp32", "amp", "amp_bf16", "fp16", "bf16", "pure_fp16", "pure_bf16")
HF_HUB_PREFIX = "hf-hub:"
_LOCAL_HINT = "pass a local file instead: --ckpt path/to/checkpoint.pt --model ARCH"


@dataclass
class LoadedModel:
    """An open_clip model ready for image embedding.

    model: the open_clip model (eval mode) on the requested device.
    preprocess: inference transform, PIL image → tensor (3, H, W) float.
    model_name: architecture name (open_clip name, ``hf-hub:...`` id, or ``custom`` for a
        config carried only by the checkpoint).
    digest: sha256 hex of the checkpoint file, or ``random-init-<name>``.
    source: where the weights came from: checkpoint path, ``hf-hub:<id>``,
        ``open_clip:<name>/<tag>`` or ``random-init``.
    embed_dim: width D of the image embeddings.
    precision: open_clip precision string the model was built with.
    """

    model: torch.nn.Module
    preprocess: Callable
    model_name: str
    digest: str
    source: str
    embed_dim: int
    precision: str = "fp32"


# ----------------------------------------------------------------------------- small helpers


def _one_line(e: BaseException, limit: int = 300) -> str:
    msg = " ".join(str(e).split())
    if len(msg) < 20:  # bare messages like KeyError(101) say nothing without their type
        msg = f"{type(e).__name__}: {msg}" if msg else type(e).__name__
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    """sha256 hex digest of a file's bytes, streamed in ``chunk``-byte blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


class _DropOpenClipFactoryLogs(logging.Filter):
    """open_clip's factory logs on the root logger ('initialized randomly', download errors)."""

    def filter(self, record):
        return not record.pathname.replace("\\", "/").endswith("open_clip/factory.py")


@contextlib.contextmanager
def _quiet_open_clip():
    flt = _DropOpenClipFactoryLogs()
    root = logging.getLogger()
    root.addFilter(flt)
    try:
        yield
    finally:
        root.removeFilter(flt)


def _check_arch_name(name: str) -> None:
    import difflib

    import open_clip

    names = open_clip.list_models()
    if name in names:
        return
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
    examples = close or [n for n in ("ViT-B-16", "ViT-B-32", "ViT-L-14", "RN50") if n in names]
    raise TreeprobeError(
        f"unknown open_clip architecture {name!r}; valid names include {', '.join(examples)} "
        f"({len(names)} in all, see open_clip.list_models())"
    )


def _check_device(device) -> str:
    dev = str(device)
    if dev.startswith("cuda") and not torch.cuda.is_available():
        raise TreeprobeError(f"device {dev!r} requested but CUDA is not available; use --device cpu")
    return dev


# ----------------------------------------------------------------------------- hub access


def _endpoint_reachable(url: str, timeout: float = 3.0) -> bool:
    """True when a TCP connection to the endpoint's host:port opens within ``timeout`` s."""
    parsed = urlparse(url)
    host = parsed.hostname
    if not host:
        return True
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    result = {"ok": False}

    def probe():
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result["ok"] = True
        except OSError:
            pass

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout + 0.5)  # name resolution is not bounded by the socket timeout
    return result["ok"]


@contextlib.contextmanager
def hub_guard(what: str, quiet: bool = True):
    """Run a hub download; turn any failure into one TreeprobeError line.

    Without network (and no proxy configured) huggingface_hub would retry for ~30 s
    before falling back to its cache; we probe once and switch it to offline mode so
    cached files still load and missing ones fail at once.
    """
    import huggingface_hub.constants as hf_constants

    env_offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}
    proxied = any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"))
    old = hf_constants.HF_HUB_OFFLINE
    offline = old or env_offline
    if not offline and not proxied and not _endpoint_reachable(hf_constants.ENDPOINT):
        offline = True
    hf_constants.HF_HUB_OFFLINE = offline
    try:
        with _quiet_open_clip(), warnings.catch_warnings():
            if quiet:
                warnings.simplefilter("ignore")
            yield
    except TreeprobeError:
        raise
    except Exception as e:  # noqa: BLE001 - anything the hub stack raises becomes one line
        state = "offline (HF_HUB_OFFLINE or no network)" if offline else "unreachable or refused the request"
        raise TreeprobeError(
            f"cannot load {what}: the Hugging Face hub is {state} and the files are not in the "
            f"local cache ({_one_line(e, 160)}); {_LOCAL_HINT}"
        ) from None
    finally:
        hf_constants.HF_HUB_OFFLINE = old


# ----------------------------------------------------------------------------- building


def _build(name: str | None, model_cfg: dict | None, preprocess_cfg: dict | None,
           precision: str, device: str, label: str):
    """Randomly initialised (seeded) open_clip model + inference transform + embed_dim.

    Built from an open_clip architecture name, or from a config dict through open_clip's
    ``local-dir:`` route (a temporary folder holding ``open_clip_config.json``).
    """
    import open_clip

    try:
        with _quiet_open_clip(), torch.random.fork_rng(devices=[]), contextlib.ExitStack() as stack:
            torch.manual_seed(0)
            if model_cfg is not None:
                tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="treeprobe-cfg-"))
                with open(os.path.join(tmp, "open_clip_config.json"), "w") as f:
                    json.dump({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg or {}}, f)
                model_id = f"local-dir:{tmp}"
                embed_dim = model_cfg.get("embed_dim")
            else:
                model_id = name
                embed_dim = (open_clip.get_model_config(name) or {}).get("embed_dim")
            model, _, preprocess = open_clip.create_model_and_transforms(
                model_id, pretrained=None, load_weights=False, precision=precision, device=device,
                pretrained_image=False, pretrained_text=False,
            )
    except TreeprobeError:
        raise
    except Exception as e:  # noqa: BLE001 - bad configs fail in many ways inside open_clip
        raise TreeprobeError(f"cannot build architecture {label}: {_one_line(e)}") from None
    embed_dim = getattr(model.visual, "output_dim", None) or embed_dim
    return model.eval(), preprocess, int(embed_dim)


# ----------------------------------------------------------------------------- checkpoints


def _torch_load(path: str, trust: bool = False):
    """torch.load on CPU with weights_only; only with ``trust`` may a file holding other Python
    objects be unpickled (that runs code from the file). → (object, weights_only_used)."""
    def load(weights_only):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*TorchScript archive.*")
            try:
                return torch.load(path, map_location="cpu", weights_only=weights_only, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):  # legacy (non-zip) checkpoints can't be memory-mapped
                    raise
                return torch.load(path, map_location="cpu", weights_only=weights_only)

    try:
        return load(True), True
    except RuntimeError as e:
        if "TorchScript" not in str(e):
            raise TreeprobeError(f"cannot read checkpoint {path}: {_one_line(e)}") from None
        raise TreeprobeError(
            f"checkpoint {path} is a TorchScript archive (like OpenAI's original release); "
            f"load it with --model NAME --pretrained openai, or re-save its state_dict()"
        ) from None
    except pickle.UnpicklingError as e:
        if "weights only load failed" not in str(e).lower():
            raise TreeprobeError(f"cannot read checkpoint {path}: {_one_line(e)}") from None
        if not trust:
            raise TreeprobeError(
                f"checkpoint {path} holds Python objects beyond tensors, and unpickling them would run code "
                f"from the file; if you trust it, pass --trust-checkpoint (API: trust_checkpoint=True)"
            ) from None
        warnings.warn(
            f"checkpoint {path} holds Python objects beyond tensors; loading it with "
            f"weights_only=False (trusted by the caller)",
            stacklevel=3,
        )
    except Exception as e:  # noqa: BLE001
        raise TreeprobeError(f"cannot read checkpoint {path}: {_one_line(e)}") from None
    try:
        return load(False), False
    except Exception as e:  # noqa: BLE001
        raise TreeprobeError(f"cannot read checkpoint {path}: {_one_line(e)}") from None


def _strip_module(sd: dict) -> dict:
    if sd and all(k.startswith("module.") for k in sd):
        return {k[len("module."):]: v for k, v in sd.items()}
    return sd


def _read_checkpoint(path: str, trust: bool = False):
    """→ (state_dict or None, metadata dict, weights_only). For safetensors only the
    header is read here (state dict None); open_clip reads the tensors when loading."""
    if path.lower().endswith(".safetensors"):
        from safetensors import safe_open

        try:
            with safe_open(path, framework="pt") as f:
                meta = dict(f.metadata() or {})
        except Exception as e:  # noqa: BLE001
            raise TreeprobeError(f"cannot read safetensors checkpoint {path}: {_one_line(e)}") from None
        out = {}
        if meta.get("model_name"):
            out["model_name"] = meta["model_name"]
        for key in ("model_cfg", "preprocess_cfg"):
            if meta.get(key):
                try:
                    out[key] = json.loads(meta[key])
                except json.JSONDecodeError:
                    raise TreeprobeError(f"safetensors metadata {key!r} of {path} is not JSON") from None
        return None, out, True

    obj, weights_only = _torch_load(path, trust)
    if not isinstance(obj, dict):
        raise TreeprobeError(f"checkpoint {path} holds a {type(obj).__name__}, not a state dict")
    if "state_dict" in obj:
        meta = {k: obj[k] for k in ("model_name", "model_cfg", "preprocess_cfg") if obj.get(k)}
        sd = obj["state_dict"]
    else:
        meta, sd = {}, obj
    if not isinstance(sd, dict) or not sd or not all(torch.is_tensor(v) for v in sd.values()):
        raise TreeprobeError(
            f"checkpoint {path} is neither a state dict nor a dict with a 'state_dict' of tensors"
        )
    return _strip_module(sd), meta, weights_only


def _mismatch_error(path: str, arch: str, model: torch.nn.Module, sd: dict | None,
                    cause: BaseException | None = None) -> TreeprobeError:
    if sd is None and path.lower().endswith(".safetensors"):
        from safetensors.torch import load_file

        sd = _strip_module(load_file(path))
    sd = sd or {}
    want = model.state_dict()
    missing = [k for k in want if k not in sd]
    unexpected = [k for k in sd if k not in want]
    shape = [k for k in want if k in sd and tuple(sd[k].shape) != tuple(want[k].shape)]

    def few(keys):
        return ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")

    parts = [f"{len(missing)} missing keys" + (f" ({few(missing)})" if missing else ""),
             f"{len(unexpected)} unexpected keys" + (f" ({few(unexpected)})" if unexpected else "")]
    if shape:
        k = shape[0]
        parts.append(f"{len(shape)} with the wrong shape (e.g. {k}: checkpoint "
                     f"{tuple(sd[k].shape)} vs model {tuple(want[k].shape)})")
    if cause is not None and not (missing or unexpected or shape):
        parts.append(_one_line(cause, 200))
    return TreeprobeError(
        f"checkpoint {path} does not match architecture {arch}: " + "; ".join(parts)
    )


def _load_weights(model: torch.nn.Module, path: str, arch: str, sd: dict | None, weights_only: bool):
    """Strictly load the checkpoint at ``path`` through open_clip (which also converts
    third-party layouts and resizes position embeddings)."""
    import open_clip

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            result = open_clip.load_checkpoint(model, path, strict=False, weights_only=weights_only)
    except Exception as e:  # noqa: BLE001 - size mismatches raise RuntimeError even non-strict
        raise _mismatch_error(path, arch, model, sd, cause=e) from None
    if result and (result.missing_keys or result.unexpected_keys):
        raise _mismatch_error(path, arch, model, sd)


def _load_from_file(path, model_name, precision, device, hub_cfg=None, source=None, trust=False) -> LoadedModel:
    path = os.path.abspath(os.fspath(path))
    if not os.path.exists(path):
        raise TreeprobeError(f"no such checkpoint file: {path}")
    if os.path.isdir(path):
        raise TreeprobeError(f"checkpoint {path} is a folder; pass the checkpoint file inside it")
    sd, meta, weights_only = _read_checkpoint(path, trust)
    if hub_cfg is not None:
        meta = {**meta, **hub_cfg}
    cfg, ck_name = meta.get("model_cfg"), meta.get("model_name")
    if cfg is not None:
        if not (isinstance(cfg, dict) and all(k in cfg for k in ("embed_dim", "vision_cfg", "text_cfg"))):
            raise TreeprobeError(
                f"checkpoint {path} carries a model_cfg without embed_dim/vision_cfg/text_cfg"
            )
        name = ck_name or model_name or "custom"
        arch_label = name if name != "custom" else "from the checkpoint's model_cfg"
    else:
        name = ck_name or model_name
        if not name:
            raise TreeprobeError(
                f"checkpoint {path} has no architecture; pass --model NAME, e.g. ViT-B-16"
            )
        _check_arch_name(name)
        arch_label = name
    if model_name and ck_name and model_name != ck_name:
        warnings.warn(
            f"checkpoint {path} was saved for {ck_name}; ignoring model={model_name!r}", stacklevel=3
        )
    model, preprocess, embed_dim = _build(
        None if cfg is not None else name, cfg, meta.get("preprocess_cfg"), precision, device, arch_label
    )
    _load_weights(model, path, arch_label, sd, weights_only)
    return LoadedModel(model=model.eval(), preprocess=preprocess, model_name=name,
                       digest=sha256_file(path), source=source or path, embed_dim=embed_dim,
                       precision=precision)


def _load_from_hub(hub_id: str, precision: str, device: str) -> LoadedModel:
    from open_clip.pretrained import download_pretrained_from_hf

    repo = hub_id[len(HF_HUB_PREFIX):].strip()
    if not repo:
        raise TreeprobeError(f"empty Hugging Face id in {hub_id!r}; expected hf-hub:org/repo")
    with hub_guard(hub_id):
        config_path = download_pretrained_from_hf(repo, filename="open_clip_config.json")
        weights_path = download_pretrained_from_hf(repo)
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise TreeprobeError(f"bad open_clip_config.json for {hub_id}: {_one_line(e)}") from None
    hub_cfg = {"model_cfg": config.get("model_cfg", config), "model_name": f"{HF_HUB_PREFIX}{repo}"}
    if config.get("preprocess_cfg"):
        hub_cfg["preprocess_cfg"] = config["preprocess_cfg"]
    return _load_from_file(weights_path, None, precision, device, hub_cfg=hub_cfg,
                           source=f"{HF_HUB_PREFIX}{repo}")


def _load_from_tag(name: str, tag: str, precision: str, device: str) -> LoadedModel:
    import open_clip
    from open_clip.pretrained import download_pretrained

    _check_arch_name(name)
    pcfg = open_clip.get_pretrained_cfg(name, tag)
    if not pcfg:
        tags = open_clip.list_pretrained_tags_by_model(name)
        raise TreeprobeError(
            f"unknown pretrained tag {tag!r} for {name}; known tags: {', '.join(tags) or 'none'}"
        )
    what = f"pretrained weights {name}/{tag}"
    with hub_guard(what):
        weights_path = download_pretrained(pcfg)
    # open_clip's own tag path, now served from the cache: it applies the tag's preprocessing
    # and warns on a QuickGELU mismatch (so warnings are not silenced here)
    with hub_guard(what, quiet=False):
        model, _, preprocess = open_clip.create_model_and_transforms(
            name, pretrained=tag, precision=precision, device=device
        )
    embed_dim = getattr(model.visual, "output_dim", None) or open_clip.get_model_config(name)["embed_dim"]
    return LoadedModel(model=model.eval(), preprocess=preprocess, model_name=name,
                       digest=sha256_file(weights_path), source=f"open_clip:{name}/{tag}",
                       embed_dim=int(embed_dim), precision=precision)


# ----------------------------------------------------------------------------- public API


def load_model(ckpt=None, model: str | None = None, pretrained: str | None = None,
               device: str = "cpu", precision: str = "fp32", trust_checkpoint: bool = False) -> LoadedModel:
    """Build an open_clip model and its inference transform.

    ckpt: local checkpoint (.pt/.pth/.bin torch file or .safetensors) or ``hf-hub:org/repo``.
    model: open_clip architecture name (``ViT-B-16``) or ``hf-hub:org/repo``; needed with
        ``ckpt`` only when the checkpoint does not name its architecture.
    pretrained: open_clip pretrained tag (``openai``) or a checkpoint path, with ``model``.
    device: torch device string; precision: one of :data:`PRECISIONS`.
    trust_checkpoint: allow unpickling non-tensor objects of a torch checkpoint (runs its code).
    ``model`` alone gives a seeded random initialisation (``source='random-init'``).
    """
    if precision not in PRECISIONS:
        raise TreeprobeError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    device = _check_device(device)
    ckpt = os.fspath(ckpt) if ckpt is not None else None
    if ckpt and ckpt.startswith(HF_HUB_PREFIX):
        return _load_from_hub(ckpt, precision, device)
    if model and model.startswith(HF_HUB_PREFIX):
        if ckpt:
            raise TreeprobeError(f"pass either a checkpoint file or {model}, not both")
        return _load_from_hub(model, precision, device)
    if ckpt:
        return _load_from_file(ckpt, model, precision, device, trust=trust_checkpoint)
    if model and pretrained:
        if os.path.isfile(pretrained):
            return _load_from_file(pretrained, model, precision, device, trust=trust_checkpoint)
        return _load_from_tag(model, pretrained, precision, device)
    if model:
        _check_arch_name(model)
        net, preprocess, embed_dim = _build(model, None, None, precision, device, model)
        return LoadedModel(model=net, preprocess=preprocess, model_name=model,
                           digest=f"random-init-{model}", source="random-init",
                           embed_dim=embed_dim, precision=precision)
    raise TreeprobeError(
        "no model given: pass --ckpt FILE, --model NAME [--pretrained TAG], or an hf-hub:org/repo id"
    )
