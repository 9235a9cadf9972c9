"""The allow-list of reference models and the one safe way to load them.

A :class:`ModelRegistry` maps names to local folders. :func:`load_model` is the loader every entry
point goes through (the model cache, the service's causal LMs and reward models, precompute and its
Ray workers, ``Frozen(path)``, ``quantize-report``, ``store import-halos`` / ``export-trl``), and
:func:`load_tokenizer` its tokenizer twin. The policy, checked on the folder *before* transformers
reads it:

- local folders only (``local_files_only=True``: no hub ids, no network);
- safetensors weights only; pickled weights (``pytorch_model.bin``, ``*.pt``, ...) only when the caller
  passes ``allow_pickle=True`` explicitly (even then transformers unpickles with ``weights_only``);
- every file a shard index (``model.safetensors.index.json``) names is a ``.safetensors`` file inside
  the folder (an index naming ``evil.bin``, ``../x.safetensors`` or an absolute path is refused: transformers
  would ``torch.load`` or read it);
- never the folder's own Python code: a ``config.json`` or ``tokenizer_config.json`` with an
  ``auto_map`` is refused, and ``trust_remote_code=False`` is passed to every ``from_pretrained``
  (so transformers never asks "Do you wish to run the custom code? [y/N]" in a terminal).

A refusal is a :class:`~refmodel.errors.ModelNotAllowed` naming the file; a folder that is not a
model folder is an :class:`~refmodel.errors.InvalidInput`.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from .._optional import import_quietly
from ..errors import ConfigError, InvalidInput, ModelNotAllowed
from .dtypes import parse_dtype
from .quantize import BNB_MODES, bnb_cast_notice_once, check_mode, quantize_model


class ModelRegistry:
    """The allow-list of reference models: ``name -> local directory`` (safetensors weights)."""

    def __init__(self, models: Mapping[str, str | Path] | None = None):
        self._models: dict[str, Path] = {}
        self._lock = threading.Lock()
        for name, path in (models or {}).items():
            self.add(name, path)

    @classmethod
    def from_pairs(cls, pairs: Iterable[str]) -> ModelRegistry:
        """Build from ``["name=path", ...]`` (CLI / environment style, :func:`parse_named_paths`)."""
        return cls(parse_named_paths(pairs))

    def add(self, name: str, path: str | Path) -> None:
        """Allow ``name``, served from the local directory ``path``."""
        if not isinstance(name, str) or not name:
            raise ConfigError(f"model names must be non-empty strings, got {name!r}")
        with self._lock:
            self._models[name] = Path(path).expanduser()

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._models)

    def resolve(self, name: str) -> Path:
        """The path of ``name``; :class:`ModelNotAllowed` listing the known names otherwise."""
        with self._lock:
            path = self._models.get(name) if isinstance(name, str) else None
        if path is None:
            raise ModelNotAllowed(f"model {name!r} is not in the registry; known models: {self.names()}. "
                                  "Models are loaded only by registered name, never by path or hub id.")
        return path

    def __contains__(self, name: object) -> bool:
        with self._lock:
            return name in self._models


def as_registry(registry: Any) -> ModelRegistry:
    """``registry`` as a :class:`ModelRegistry` (``None``: empty; a dict; or any object with ``resolve``/``names``)."""
    if registry is None:
        return ModelRegistry()
    if isinstance(registry, ModelRegistry):
        return registry
    if isinstance(registry, Mapping):
        return ModelRegistry(registry)
    if callable(getattr(registry, "resolve", None)) and callable(getattr(registry, "names", None)):
        return registry  # duck-typed registry
    raise ConfigError(f"registry must be a ModelRegistry or a {{name: path}} dict, got {type(registry).__name__}")


def parse_named_paths(values: Iterable[str], flag: str = "model entry") -> dict[str, str]:
    """``["a=/p/a", "b=/p/b"]`` -> ``{"a": "/p/a", ...}`` (CLI / environment style ``NAME=PATH`` pairs).

    Names and paths are stripped; a malformed or repeated entry is a :class:`ConfigError` naming ``flag``.
    """
    out: dict[str, str] = {}
    for value in values:
        name, sep, path = str(value).partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not name or not path:
            raise ConfigError(f"{flag} expects NAME=PATH, got {value!r}")
        if name in out:
            raise ConfigError(f"{flag} names {name!r} twice")
        out[name] = path
    return out


# Weight files that torch / transformers read with pickle.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
Task = Literal["causal-lm", "sequence-classification"]
# from_pretrained options that would undo the policy; the policy's own arguments say how to relax it.
_POLICY_KWARGS = ("trust_remote_code", "use_safetensors", "local_files_only", "weights_only", "code_revision")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidInput(f"cannot read {path}: {type(exc).__name__}: {exc}; expected a JSON object") from exc
    if not isinstance(data, dict):
        raise InvalidInput(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _refuse_remote_code(path: Path) -> None:
    """ModelNotAllowed when a config in the folder points transformers at the folder's own code."""
    for name in ("config.json", "tokenizer_config.json", "preprocessor_config.json", "processor_config.json"):
        file = path / name
        if not file.is_file():
            continue
        data = _read_json(file)
        nested = [data] + [v for v in data.values() if isinstance(v, dict)]  # e.g. text_config of a VLM
        auto_map = next((d["auto_map"] for d in nested if d.get("auto_map")), None)
        if auto_map:
            raise ModelNotAllowed(
                f"{file} has an auto_map ({json.dumps(auto_map)[:200]}): loading it would run the folder's "
                "own Python code (trust_remote_code), which refmodel never does. Use a model whose "
                "architecture ships with transformers; if it does (model_type "
                f"{data.get('model_type', '?')!r}), delete the auto_map entry from {file.name}.")


def check_model_folder(path: str | Path, *, allow_pickle: bool = False, what: str = "model") -> Path:
    """Check ``path`` against the loading policy (module docstring) without loading anything; returns it.

    Raises:
        InvalidInput: not a local folder with a ``config.json``, or no weight files at all.
        ModelNotAllowed: an ``auto_map`` (custom code) in a config, only pickled weights while
            ``allow_pickle`` is False, or a shard index naming a file outside the folder or not a
            ``.safetensors`` file (unless ``allow_pickle``); the message names the file.
    """
    path = Path(path).expanduser()
    if not path.is_dir() or not (path / "config.json").is_file():
        raise InvalidInput(f"{what} path {str(path)!r} is not a local model folder with a config.json; "
                           "refmodel loads models from local folders only (no hub ids: download them first, "
                           "e.g. `hf download NAME --local-dir DIR`)")
    _refuse_remote_code(path)
    _check_indexes(path, allow_pickle)
    if any(path.glob("*.safetensors")):
        return path
    pickled = sorted(f for f in path.iterdir() if f.suffix in PICKLE_SUFFIXES)
    if not pickled:
        raise InvalidInput(f"{what} folder {str(path)!r} holds no weights (no *.safetensors file)")
    if not allow_pickle:
        raise ModelNotAllowed(
            f"no *.safetensors weights in {str(path)!r}, only pickled ones ({pickled[0]}); refmodel never "
            "loads pickled (.bin/.pt) weights unless you pass allow_pickle=True. Convert them with "
            "save_pretrained(dir, safe_serialization=True) in a process you trust.")
    return path


# The index transformers reads to find a sharded checkpoint's files, per weight format.
_INDEX = {"safetensors": "model.safetensors.index.json", "pickle": "pytorch_model.bin.index.json"}


def _check_indexes(path: Path, allow_pickle: bool) -> None:
    """ModelNotAllowed unless every file a shard index names is a weight file inside ``path``.

    transformers opens what an index's ``weight_map`` names, joined to the folder: a name ending in
    ``.bin`` is ``torch.load``-ed (pickle) even from the safetensors index, and ``../x`` or an absolute
    path leaves the folder. So each name must resolve (symlinks followed) inside ``path``, and end in
    ``.safetensors`` unless ``allow_pickle`` (then the pickled suffixes too).
    """
    folder = path.resolve()
    allowed = (".safetensors",) + (PICKLE_SUFFIXES if allow_pickle else ())
    for kind, name in _INDEX.items():
        index = path / name
        if not index.is_file() or (kind == "pickle" and not allow_pickle):
            continue  # without allow_pickle nothing reads the pickle index (use_safetensors=True)
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise InvalidInput(f"{index} has no weight_map of tensor name -> file name; expected "
                               '{"weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors", ...}}')
        for file in sorted(set(weight_map.values())):
            target = (path / file).resolve()
            if not target.is_relative_to(folder):
                raise ModelNotAllowed(f"{index} names the weight file {file!r}, which is outside the model folder "
                                      f"({target}); an index may name only files inside {folder}")
            if target.suffix not in allowed:
                raise ModelNotAllowed(
                    f"{index} names the weight file {file!r}, which is not a .safetensors file"
                    + ("" if allow_pickle else "; transformers would unpickle it, and refmodel never loads "
                       "pickled weights unless you pass allow_pickle=True")
                    + ". Fix the index's weight_map, or convert the weights with "
                    "save_pretrained(dir, safe_serialization=True) in a process you trust.")


def _indexed_files(index: Path) -> set[str] | None:
    """The file names an index's ``weight_map`` points to; None without a readable index."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        return {str(v) for v in weight_map.values()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def weights_bytes(path: str | Path) -> int | None:
    """Bytes of the weight files :func:`load_model` reads from a local model folder; None when ``path``
    is not a local folder (its size is unknown: a hub id, a URL).

    The one rule for a reference's on-disk size (the hybrid placement of ``auto`` and of
    ``rl.forward_backward`` compare it to ``max_local_bytes``): the ``*.safetensors`` files when the folder
    has any, else the pickled ones (:data:`PICKLE_SUFFIXES`), as the loader prefers them; a folder that ships
    both formats (common on the hub) counts once. With a shard index only the files it names count
    (a ``consolidated.safetensors`` beside the shards is not loaded).
    """
    folder = Path(path).expanduser()
    if not folder.is_dir():
        return None
    for kind, suffixes in (("safetensors", (".safetensors",)), ("pickle", PICKLE_SUFFIXES)):
        files = [f for f in folder.iterdir() if f.suffix in suffixes and f.is_file()]
        if not files:
            continue
        named = _indexed_files(folder / _INDEX[kind])
        if named is not None:
            files = [f for f in files if f.name in named]
        return sum(f.stat().st_size for f in files)
    return 0


def load_tokenizer(path: str | Path):
    """The tokenizer of a local model folder: ``trust_remote_code=False``, no network.

    Raises :class:`ModelNotAllowed` when ``tokenizer_config.json`` (or ``config.json``) has an ``auto_map``.
    """
    path = Path(path).expanduser()
    if not path.is_dir():
        raise InvalidInput(f"tokenizer path {str(path)!r} is not a local folder")
    _refuse_remote_code(path)
    transformers = import_quietly("transformers")
    return transformers.AutoTokenizer.from_pretrained(path, trust_remote_code=False, local_files_only=True)


def load_model(path: str | Path, *, task: Task = "causal-lm", dtype: str | torch.dtype | None = None,
               device: str | torch.device | None = None, quantize: str | None = None, allow_pickle: bool = False,
               attn_implementation: str | None = None, what: str = "model", freeze: bool = True,
               **from_pretrained_kwargs: Any) -> nn.Module:
    """Load a frozen model from a local folder under the loading policy (module docstring).

    Args:
        path: folder with ``config.json`` and ``*.safetensors`` weights.
        task: ``"causal-lm"`` (``AutoModelForCausalLM``) or ``"sequence-classification"`` (reward models).
        dtype: ``torch.dtype`` or name (see :func:`refmodel.models.dtypes.parse_dtype`); ``None`` keeps the
            stored dtype.
        device: where the model lives (``None``: where transformers puts it, the CPU).
        quantize: ``None`` or a mode of :data:`refmodel.models.quantize.QUANT_MODES`. bitsandbytes modes
            quantize while loading (``load_in_8bit`` / ``load_in_4bit``), torchao modes right after.
        allow_pickle: also accept pickled weights (``pytorch_model.bin``) when there are no safetensors.
        attn_implementation: passed to ``from_pretrained`` (e.g. ``"eager"``).
        what: how error messages name the model (``"--model"``, ``"reward model 'rm'"``).
        freeze: turn ``requires_grad`` off on every parameter (``False`` for a policy to train).
        from_pretrained_kwargs: more ``from_pretrained`` options; none that would relax the policy.
    Returns:
        the model in eval mode (with ``requires_grad`` off unless ``freeze=False``).
    """
    check_mode(quantize)
    if task not in ("causal-lm", "sequence-classification"):
        raise ConfigError(f"task must be 'causal-lm' or 'sequence-classification', got {task!r}")
    relaxing = sorted(k for k in from_pretrained_kwargs if k in _POLICY_KWARGS)
    if relaxing:
        raise ConfigError(f"{relaxing} cannot be passed to the refmodel loader: it never runs a model folder's "
                          "code and loads pickled weights only with allow_pickle=True")
    path = check_model_folder(path, allow_pickle=allow_pickle, what=what)
    torch_dtype = parse_dtype(dtype, what=f"{what} dtype")
    kwargs: dict[str, Any] = dict(from_pretrained_kwargs, trust_remote_code=False, local_files_only=True,
                                  use_safetensors=None if allow_pickle else True)
    # None means the stored dtype: "auto" says so to every supported transformers (5.x defaults to it; 4.x
    # defaults to float32, and to float16 for load_in_4bit/8bit, which put an NF4 reference's unquantized
    # layers in float16 at the 4.56 floor: 0.04 nats off the same NF4 weights quantized after loading)
    kwargs["dtype"] = torch_dtype if torch_dtype is not None else "auto"
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    # transformers 5.23's from_pretrained is not thread-safe: two concurrent loads of tied-embedding
    # models (GPT-2, Gemma-2) left lm_head "MISSING ... newly initialized" (random!) in our runs, and
    # the lazy `transformers` module raised ImportError on a concurrent first import. So the
    # from_pretrained step runs under a process-wide lock; quantization and the rest run in parallel.
    with _FROM_PRETRAINED_LOCK:
        model = _from_pretrained(path, task, kwargs, device, quantize)
    if quantize is not None and quantize not in BNB_MODES:
        quantize_model(model, quantize)
    elif quantize in BNB_MODES:
        bnb_cast_notice_once()  # transformers built the bitsandbytes layers (load_in_8bit / load_in_4bit)
    model.eval()
    if freeze:
        model.requires_grad_(False)
    return model


def load_reference_model(path: str | Path, dtype: str | torch.dtype | None = None,
                         device: str | torch.device = "cpu", quantize: str | None = None,
                         allow_pickle: bool = False) -> nn.Module:
    """A frozen causal LM from a local folder: :func:`load_model` with ``task="causal-lm"``.

    Kept as the model cache's loader (``ReferenceModelCache.loader``) and for the public API.
    """
    return load_model(path, dtype=dtype, device=device, quantize=quantize, allow_pickle=allow_pickle,
                      what="reference model")


_FROM_PRETRAINED_LOCK = threading.Lock()


def _from_pretrained(path: Path, task: Task, kwargs: dict[str, Any], device, quantize: str | None) -> nn.Module:
    import_quietly("transformers.modeling_utils")  # imports torchao when installed: see refmodel._optional
    import transformers

    auto = (transformers.AutoModelForCausalLM if task == "causal-lm"
            else transformers.AutoModelForSequenceClassification)
    if quantize in BNB_MODES:
        compute = kwargs["dtype"] if kwargs["dtype"] != "auto" else torch.float32
        qconfig = (transformers.BitsAndBytesConfig(load_in_8bit=True) if quantize == "bnb-int8" else
                   transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                   bnb_4bit_compute_dtype=compute))
        return auto.from_pretrained(path, quantization_config=qconfig, device_map=str(device or "cpu"), **kwargs)
    model = auto.from_pretrained(path, **kwargs)
    return model.to(device) if device is not None else model


__all__ = ["ModelRegistry", "PICKLE_SUFFIXES", "as_registry", "check_model_folder", "load_model",
           "load_reference_model", "load_tokenizer", "parse_named_paths", "weights_bytes"]
