"""The one open_clip model factory of treeprobe (analysis and training): local checkpoints,
``hf-hub:`` ids, pretrained tags, random init.

:func:`create_model` builds an open_clip model from an architecture name (an open_clip
name, an alias such as ``tiny`` for the bundled ``treeprobe-tiny`` config, a config
``.json`` file, an ``hf-hub:`` id) or a ``model_cfg`` dict, with optional pretrained weights
(a tag or a local file) and a seeded random init; ``treeprobe train`` builds its model with it.

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
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

import torch

from treeprobe._utils import one_line
from treeprobe.errors import TreeprobeError

__all__ = [
    "PRECISIONS",
    "HF_HUB_PREFIX",
    "MODEL_ALIASES",
    "LoadedModel",
    "OpenClipModel",
    "sha256_file",
    "hub_guard",
    "resolve_model_name",
    "create_model",
    "load_model",
]

PRECISIONS = ("fp32", "amp", "amp_bf16", "fp16", "bf16", "pure_fp16", "pure_bf16")
HF_HUB_PREFIX = "hf-hub:"
LOCAL_DIR_PREFIX = "local-dir:"
#: Short names for the architectures bundled in ``treeprobe/training/configs/``.
MODEL_ALIASES = {"tiny": "treeprobe-tiny"}
#: The seed of a random initialisation (``random-init-<name>`` always names the same weights).
RANDOM_INIT_SEED = 0
_LOCAL_HINT = "pass a local file instead: --ckpt path/to/checkpoint.pt --model ARCH"
_HUB_PROBE_TIMEOUT_S = 3.0


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


@dataclass
class OpenClipModel:
    """What :func:`create_model` builds.

    model: the open_clip model (train mode, as open_clip returns it) on the requested device.
    preprocess_train / preprocess_val: open_clip's transforms, PIL image → tensor (3, H, W) float.
    name: the resolved architecture name (``treeprobe-tiny`` for ``tiny``, a config file's stem,
        an ``hf-hub:`` id, or ``label`` for a ``model_cfg`` dict).
    model_cfg: the architecture config dict (with the ``image_size`` override applied).
    embed_dim: width D of the embeddings.
    weights_file: the local file the weights came from (a ``pretrained`` file or the
        downloaded file of a tag), else None.
    """

    model: torch.nn.Module
    preprocess_train: Callable
    preprocess_val: Callable
    name: str
    model_cfg: dict
    embed_dim: int
    weights_file: str | None = None


# ----------------------------------------------------------------------------- small helpers


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
        f"({len(names)} in all, see open_clip.list_models()), the alias 'tiny' or a config .json file"
    )


def _check_device(device) -> str:
    dev = str(device)
    if dev.startswith("cuda") and not torch.cuda.is_available():
        raise TreeprobeError(f"device {dev!r} requested but CUDA is not available; use --device cpu")
    return dev


# ----------------------------------------------------------------------------- hub access


def _endpoint_reachable(url: str, timeout: float = _HUB_PROBE_TIMEOUT_S) -> bool:
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
def hub_guard(what: str, quiet: bool = True, *, hint: str = _LOCAL_HINT):
    """Run a hub download; turn any failure into one TreeprobeError line (ending with ``hint``).

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
            f"local cache ({one_line(e, 160)}); {hint}"
        ) from None
    finally:
        hf_constants.HF_HUB_OFFLINE = old


# ----------------------------------------------------------------------------- the factory


def _register_bundled_configs() -> None:
    """Add ``treeprobe/training/configs/*.json`` (``treeprobe-tiny``) to open_clip's registry."""
    import open_clip

    import treeprobe.training

    if MODEL_ALIASES["tiny"] not in open_clip.list_models():
        open_clip.add_model_config(Path(treeprobe.training.__file__).resolve().parent / "configs")


def resolve_model_name(model: str) -> str:
    """The open_clip architecture name for ``model``: an alias (``tiny`` → ``treeprobe-tiny``),
    a config ``.json`` file (registered under its file stem), else ``model`` unchanged.

    >>> resolve_model_name("tiny")
    'treeprobe-tiny'
    """
    import open_clip

    _register_bundled_configs()
    model = MODEL_ALIASES.get(model, model)
    if model.endswith(".json") and os.path.isfile(model):
        open_clip.add_model_config(Path(model))
        return Path(model).stem
    return model


@contextlib.contextmanager
def _init_rng(seed: int | None):
    """Random init from ``seed`` under a forked CPU RNG (the global state is left alone);
    ``seed=None``: from the global torch RNG as the caller seeded it (and advancing it)."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _check_pretrained_tag(name: str, tag: str) -> None:
    import open_clip

    if not open_clip.get_pretrained_cfg(name, tag):
        tags = open_clip.list_pretrained_tags_by_model(name)
        raise TreeprobeError(
            f"unknown pretrained tag {tag!r} for {name} (neither a file nor an open_clip tag); "
            f"known tags: {', '.join(tags) or 'none'}"
        )


def _download_tag(name: str, tag: str, cache_dir: str | None, hint: str) -> str:
    """Path of the weights file of ``name``/``tag``, downloaded into open_clip's cache if needed."""
    import open_clip
    from open_clip.pretrained import download_pretrained

    with hub_guard(f"pretrained weights {name}/{tag}", hint=hint):
        return download_pretrained(open_clip.get_pretrained_cfg(name, tag), cache_dir=cache_dir)


def _final_cfg(model_id: str, model_cfg: dict | None, image_size: int | None) -> dict:
    import open_clip

    cfg = dict(model_cfg if model_cfg is not None else (open_clip.get_model_config(model_id) or {}))
    if image_size is not None and "vision_cfg" in cfg:
        cfg["vision_cfg"] = {**cfg["vision_cfg"], "image_size": image_size}
    return cfg


def create_model(model: str | None = None, *, model_cfg: dict | None = None, preprocess_cfg: dict | None = None,
                 pretrained: str | None = None, image_size: int | None = None, precision: str = "fp32",
                 device="cpu", cache_dir: str | None = None, seed: int | None = RANDOM_INIT_SEED,
                 output_dict: bool | None = None, pretrained_text: bool = False, label: str | None = None,
                 hint: str = _LOCAL_HINT) -> OpenClipModel:
    """Build one open_clip model (see :class:`OpenClipModel`); the factory of analysis and training.

    model: architecture (open_clip name, alias ``tiny``, config ``.json`` path, ``hf-hub:`` id);
        or model_cfg: a config dict (+ optional preprocess_cfg), built through open_clip's
        ``local-dir:`` route. pretrained: an open_clip tag (downloaded, offline → one-line
        :class:`TreeprobeError` ending with ``hint``) or a local weights file. image_size: open_clip
        ``force_image_size`` (pixels). seed: random init from this seed under a forked RNG
        (``None``: from the global torch RNG). output_dict / pretrained_text: as open_clip's
        (``pretrained_text`` fetches the base weights of a Hugging Face text tower when no CLIP
        weights are loaded). label: the name used in error messages.
    """
    import open_clip

    if model_cfg is not None:
        return _create_from_cfg(model_cfg, preprocess_cfg=preprocess_cfg, precision=precision, device=device,
                                seed=seed, label=label or model or "custom", image_size=image_size,
                                output_dict=output_dict)
    if not model:
        raise TreeprobeError("no architecture given: pass an open_clip name, 'tiny' or a config .json")
    name = resolve_model_name(model)
    hub = name.startswith(HF_HUB_PREFIX)
    if not hub and not name.startswith(LOCAL_DIR_PREFIX):
        _check_arch_name(name)
    tag = pretrained if pretrained and not os.path.isfile(pretrained) else None
    if tag:
        _check_pretrained_tag(name, tag)
    weights_file = _download_tag(name, tag, cache_dir, hint) if tag else pretrained or None
    kwargs = dict(pretrained=pretrained or None, precision=precision, device=device, force_image_size=image_size,
                  cache_dir=cache_dir, output_dict=output_dict, pretrained_image=False,
                  pretrained_text=pretrained_text)
    # open_clip's own path for tags (served from the cache now): it applies the tag's
    # preprocessing and warns on a QuickGELU mismatch, so warnings are not silenced there
    guard = hub_guard(name if hub else f"pretrained weights {name}/{tag}", quiet=hub, hint=hint) \
        if hub or tag else _build_errors(label or name, pretrained)
    with guard, _quiet_open_clip(), _init_rng(seed):
        net, pre_train, pre_val = open_clip.create_model_and_transforms(name, **kwargs)
        cfg = _final_cfg(name, None, image_size)  # inside the guard: an hf-hub config comes from the hub
    return OpenClipModel(model=net, preprocess_train=pre_train, preprocess_val=pre_val, name=name, model_cfg=cfg,
                         embed_dim=_embed_dim(net, cfg), weights_file=weights_file)


def _create_from_cfg(model_cfg: dict, *, preprocess_cfg, precision, device, seed, label, image_size,
                     output_dict) -> OpenClipModel:
    """:func:`create_model` from a config dict: a temporary ``local-dir:`` folder holding
    ``open_clip_config.json`` (no weights in it)."""
    import open_clip

    with _build_errors(label), _quiet_open_clip(), _init_rng(seed), \
            tempfile.TemporaryDirectory(prefix="treeprobe-cfg-") as tmp:
        with open(os.path.join(tmp, "open_clip_config.json"), "w") as f:
            json.dump({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg or {}}, f)
        net, pre_train, pre_val = open_clip.create_model_and_transforms(
            f"{LOCAL_DIR_PREFIX}{tmp}", pretrained=None, load_weights=False, precision=precision, device=device,
            force_image_size=image_size, output_dict=output_dict, pretrained_image=False, pretrained_text=False,
        )
    cfg = _final_cfg("", model_cfg, image_size)
    return OpenClipModel(model=net, preprocess_train=pre_train, preprocess_val=pre_val, name=label, model_cfg=cfg,
                         embed_dim=_embed_dim(net, cfg))


@contextlib.contextmanager
def _build_errors(label: str, weights: str | None = None):
    """Bad configs (and weights files) fail in many ways inside open_clip: one TreeprobeError line."""
    try:
        yield
    except TreeprobeError:
        raise
    except Exception as e:  # noqa: BLE001
        what = f"architecture {label}" + (f" with the weights of {weights}" if weights else "")
        raise TreeprobeError(f"cannot build {what}: {one_line(e)}") from None


def _embed_dim(net: torch.nn.Module, cfg: dict) -> int:
    return int(getattr(getattr(net, "visual", None), "output_dim", None) or cfg.get("embed_dim") or 0)


def _build(name: str | None, model_cfg: dict | None, preprocess_cfg: dict | None, *,
           precision: str, device: str, label: str):
    """Seeded random init for inference: (model in eval mode, inference transform, embed_dim)."""
    built = create_model(name, model_cfg=model_cfg, preprocess_cfg=preprocess_cfg, precision=precision,
                         device=device, label=label)
    return built.model.eval(), built.preprocess_val, built.embed_dim


# ----------------------------------------------------------------------------- checkpoints


#: First bytes of the containers a checkpoint file can be: torch.save's zip archive (also TorchScript),
#: and the pickle of a legacy torch.save (protocol 2..5 opcode).
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTO_OPCODE = 0x80
#: Other formats a wrong file often is, by their first bytes → what to say.
_OTHER_FORMATS = (
    (b"version https://git-lfs", "a Git LFS pointer, not the file itself: run `git lfs pull`"),
    (b"\x1f\x8b", "a gzip file: decompress it first"),
    (b"\x93NUMPY", "a numpy .npy array"),
    (b"\x89HDF", "an HDF5 file (Keras/TensorFlow weights?)"),
    (b"PK\x05\x06", "an empty zip archive"),
)
_HEAD_BYTES = 32
_TEXT_BYTES = set(range(32, 127)) | {9, 10, 13}


def _looks_safetensors(head: bytes, size: int) -> bool:
    """A safetensors file starts with its JSON header's length (u64 little-endian), then ``{``."""
    return len(head) > 8 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < size


def _describe_head(head: bytes) -> str:
    """The first bytes of a file, as text when they are printable, else as hex."""
    if set(head) <= _TEXT_BYTES:
        return f"text {' '.join(head.decode('ascii').split())[:24]!r}"
    return "bytes " + head[:8].hex(" ")


def _sniff(path: str) -> tuple[str | None, bytes]:
    """(container, first bytes) of a file: ``'zip'`` (torch.save), ``'pickle'`` (legacy torch.save),
    ``'safetensors'``, ``'empty'`` or None (something else)."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(_HEAD_BYTES)
    except OSError as e:
        raise TreeprobeError(f"cannot read checkpoint {path}: {one_line(e)}") from None
    if not head:
        return "empty", head
    if head.startswith(_ZIP_MAGIC):
        return "zip", head
    if head[0] == _PICKLE_PROTO_OPCODE and len(head) > 1 and 2 <= head[1] <= 5:
        return "pickle", head
    if _looks_safetensors(head, size):
        return "safetensors", head
    return None, head


_EMPTY = "the file is empty (0 bytes): its write did not finish or the copy failed"


def check_checkpoint_bytes(path: str) -> str:
    """The container of the checkpoint file ``path`` by its first bytes: ``'zip'`` (torch.save),
    ``'pickle'`` (legacy torch.save) or ``'safetensors'``; a one-line :class:`TreeprobeError` for an
    empty file or any other content (it says what the file starts with, and what it is when known)."""
    kind, head = _sniff(path)
    if kind == "empty":
        raise TreeprobeError(f"cannot read checkpoint {path}: {_EMPTY}")
    if kind is None:
        known = next((what for magic, what in _OTHER_FORMATS if head.startswith(magic)), None)
        raise TreeprobeError(
            f"cannot read checkpoint {path}: it is not a PyTorch checkpoint (it starts with {_describe_head(head)}"
            + (f": {known}" if known else "")
            + "); expected a file written by torch.save (.pt, .pth, .bin) or a .safetensors file"
        )
    return kind


def _unreadable(path: str, kind: str, e: BaseException) -> TreeprobeError:
    """The error for a checkpoint whose container (``kind``) torch cannot read."""
    msg = str(e)
    torn = isinstance(e, EOFError) or "central directory" in msg or "unexpected EOF" in msg
    if torn:
        what = "zip archive" if kind == "zip" else "pickle"
        return TreeprobeError(f"checkpoint {path} is truncated or corrupted (its {what} ends early: "
                              f"{one_line(e, 120)}); write or copy it again")
    return TreeprobeError(f"cannot read checkpoint {path}: {one_line(e)}")


def _torch_load(path: str, trust: bool = False):
    """torch.load on CPU with weights_only; only with ``trust`` may a file holding other Python
    objects be unpickled (that runs code from the file). → (object, weights_only_used).

    The file must be a torch.save zip or pickle (:func:`check_checkpoint_bytes`): random bytes,
    an empty or a safetensors file fail with what they are, and only a real pickle that the
    weights-only reader refuses gets the ``--trust-checkpoint`` hint."""
    kind = check_checkpoint_bytes(path)
    if kind == "safetensors":
        raise TreeprobeError(f"checkpoint {path} is a safetensors file; name it *.safetensors to load it")

    def load(weights_only):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*TorchScript archive.*")
            warnings.filterwarnings("ignore", message=".*pickle protocol.*")
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
            raise _unreadable(path, kind, e) from None
        raise TreeprobeError(
            f"checkpoint {path} is a TorchScript archive (like OpenAI's original release); "
            f"load it with --model NAME --pretrained openai, or re-save its state_dict()"
        ) from None
    except pickle.UnpicklingError as e:
        if "weights only load failed" not in str(e).lower():
            raise _unreadable(path, kind, e) from None
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
        raise _unreadable(path, kind, e) from None
    try:
        return load(False), False
    except Exception as e:  # noqa: BLE001
        raise _unreadable(path, kind, e) from None


def _strip_module(sd: dict) -> dict:
    if sd and all(k.startswith("module.") for k in sd):
        return {k[len("module."):]: v for k, v in sd.items()}
    return sd


def _read_checkpoint(path: str, trust: bool = False):
    """→ (state_dict or None, metadata dict, weights_only). For safetensors only the
    header is read here (state dict None); open_clip reads the tensors when loading."""
    if path.lower().endswith(".safetensors"):
        from safetensors import safe_open

        kind = _sniff(path)[0]
        if kind in ("zip", "pickle"):
            raise TreeprobeError(f"checkpoint {path} is a torch.save file, not safetensors; name it *.pt to load it")
        if kind == "empty":
            raise TreeprobeError(f"cannot read safetensors checkpoint {path}: {_EMPTY}")

        try:
            with safe_open(path, framework="pt") as f:
                meta = dict(f.metadata() or {})
        except Exception as e:  # noqa: BLE001
            raise TreeprobeError(f"cannot read safetensors checkpoint {path}: {one_line(e)}") from None
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
        parts.append(one_line(cause, 200))
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
        arch_label = name
    if model_name and ck_name and model_name != ck_name:
        warnings.warn(
            f"checkpoint {path} was saved for {ck_name}; ignoring model={model_name!r}", stacklevel=3
        )
    model, preprocess, embed_dim = _build(None if cfg is not None else name, cfg, meta.get("preprocess_cfg"),
                                          precision=precision, device=device, label=arch_label)
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
        raise TreeprobeError(f"bad open_clip_config.json for {hub_id}: {one_line(e)}") from None
    hub_cfg = {"model_cfg": config.get("model_cfg", config), "model_name": f"{HF_HUB_PREFIX}{repo}"}
    if config.get("preprocess_cfg"):
        hub_cfg["preprocess_cfg"] = config["preprocess_cfg"]
    return _load_from_file(weights_path, None, precision, device, hub_cfg=hub_cfg,
                           source=f"{HF_HUB_PREFIX}{repo}")


def _load_from_tag(name: str, tag: str, precision: str, device: str) -> LoadedModel:
    built = create_model(name, pretrained=tag, precision=precision, device=device)
    return LoadedModel(model=built.model.eval(), preprocess=built.preprocess_val, model_name=name,
                       digest=sha256_file(built.weights_file), source=f"open_clip:{name}/{tag}",
                       embed_dim=built.embed_dim, precision=precision)


# ----------------------------------------------------------------------------- public API


def load_model(ckpt=None, model: str | None = None, pretrained: str | None = None, *,
               device: str = "cpu", precision: str = "fp32", trust_checkpoint: bool = False) -> LoadedModel:
    """Build an open_clip model and its inference transform (eval mode; see :class:`LoadedModel`).

    ckpt: local checkpoint (.pt/.pth/.bin torch file or .safetensors) or ``hf-hub:org/repo``.
    model: open_clip architecture name (``ViT-B-16``, the alias ``tiny``, a config .json) or
        ``hf-hub:org/repo``; needed with ``ckpt`` only when the checkpoint does not name its
        architecture.
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
    if model:
        model = resolve_model_name(model)
    if ckpt:
        return _load_from_file(ckpt, model, precision, device, trust=trust_checkpoint)
    if model and pretrained:
        if os.path.isfile(pretrained):
            return _load_from_file(pretrained, model, precision, device, trust=trust_checkpoint)
        return _load_from_tag(model, pretrained, precision, device)
    if model:
        net, preprocess, embed_dim = _build(model, None, None, precision=precision, device=device, label=model)
        return LoadedModel(model=net, preprocess=preprocess, model_name=model,
                           digest=f"random-init-{model}", source="random-init",
                           embed_dim=embed_dim, precision=precision)
    raise TreeprobeError(
        "no model given: pass --ckpt FILE, --model NAME [--pretrained TAG], or an hf-hub:org/repo id"
    )
