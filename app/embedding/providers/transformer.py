"""Provider ``transformer``: a Hugging Face transformers encoder, run locally with torch.

The source is a transformers folder, or a sentence-transformers folder (``modules.json``
with Transformer, Pooling and Normalize modules) from which pooling, normalisation and
the token limit are read. Options (:class:`~segue.embedding.providers.options.TransformerOptions`),
each part of the model's identity:

* ``dtype`` — ``float32`` (default), ``float16`` or ``bfloat16``: the weights' type on every device;
* ``attention`` — ``sdpa`` (default) or ``eager``;
* ``prefix`` — text put before every input, as E5-style models want (``"passage: "``).

The fingerprint hashes the weights, the vocabulary and the settings above; options at
their defaults are left out of it, so models registered before an option existed keep
their identity.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from segue.embedding.providers.base import OptionsError, Prepared, fingerprint, resolve_source
from segue.embedding.providers.options import DTYPES, TransformerOptions, from_config
from segue.spec import ModelProfile, ModelSpec

NAME = "transformer"
TORCH_DTYPES = {name: getattr(torch, name) for name in DTYPES}
POOLINGS = ("mean", "cls", "max")
ST_POOLING_FLAGS = {
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
}


def inspect(source: str, options: TransformerOptions) -> ModelProfile:
    """Load the model at ``source`` once and profile it."""
    return _read(resolve_source(source), options).profile


def load(spec: ModelSpec, device: str | None) -> TransformerEmbedder:
    """The registered model on ``device`` (None: cuda when present, else cpu) in its registered dtype."""
    options = from_config(NAME, spec.config)
    read = _read(resolve_source(spec.source), options)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        # torch defaults to one thread per core of the machine, which can exceed the cores this
        # process may use; tokenizer threads would only add contention.
        torch.set_num_threads(min(torch.get_num_threads(), len(os.sched_getaffinity(0))))
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    read.model.to(device=device, dtype=TORCH_DTYPES[options.dtype])
    return TransformerEmbedder(read.profile, read.model, read.tokenizer, read.pooling, options.prefix, device)


class TransformerEmbedder:
    """Mean, CLS or max pooling over the encoder's last hidden state, as sentence-transformers does.

    Each text is tokenized once, without truncation: the count is what the truncation
    ledger needs, and the model's input is cut from the same ids exactly as the tokenizer
    would truncate (the content is cut, the special tokens around it stay). On a GPU the
    ids are copied from pinned memory without blocking, and the tokenizer uses every core.
    """

    def __init__(self, profile: ModelProfile, model, tokenizer, pooling: str, prefix: str, device: str):
        self.profile = profile
        self.device = device
        self._model = model
        self._tokenizer = tokenizer
        self._pooling = pooling
        self._prefix = prefix
        self._pad_id = tokenizer.pad_token_id or 0
        self._tail = _special_tokens_after(tokenizer)
        self._pinned = device.startswith("cuda")

    def prepare(self, texts: Sequence[str]) -> Prepared:
        encoded = self._tokenizer([self._prefix + text for text in texts], truncation=False, verbose=False,
                                  return_attention_mask=False, return_token_type_ids=False)["input_ids"]
        tokens = [len(ids) for ids in encoded]
        limit = self.profile.max_tokens
        ids = np.full((len(encoded), min(max(tokens), limit)), self._pad_id, dtype=np.int64)
        mask = np.zeros(ids.shape, dtype=np.int64)
        for row, sequence in enumerate(encoded):
            if len(sequence) > limit:
                sequence = sequence[:limit - self._tail] + sequence[len(sequence) - self._tail:]
            ids[row, :len(sequence)] = sequence
            mask[row, :len(sequence)] = 1
        inputs = (torch.from_numpy(ids), torch.from_numpy(mask))
        return Prepared(tokens, tuple(tensor.pin_memory() for tensor in inputs) if self._pinned else inputs)

    def embed(self, prepared: Prepared) -> np.ndarray:
        ids, mask = (tensor.to(self.device, non_blocking=True) for tensor in prepared.inputs)
        with torch.inference_mode():
            hidden = self._model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
            return _pool(hidden, mask, self._pooling).cpu().numpy()

    def token_spans(self, texts: Sequence[str]) -> list[list[tuple[int, int]]]:
        encoded = self._tokenizer(list(texts), add_special_tokens=False, truncation=False, verbose=False,
                                  return_offsets_mapping=True, return_attention_mask=False,
                                  return_token_type_ids=False)["offset_mapping"]
        return [[(start, end) for start, end in spans] for spans in encoded]

    def close(self) -> None:
        self._model = None
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()


def _special_tokens_after(tokenizer) -> int:
    """How many special tokens the tokenizer puts after a text's content ([SEP], </s>): truncation keeps them."""
    bare = tokenizer("segue", add_special_tokens=False, verbose=False)["input_ids"]
    full = tokenizer("segue", verbose=False)["input_ids"]
    starts = [i for i in range(len(full) - len(bare) + 1) if full[i:i + len(bare)] == bare]
    if not starts:
        raise ValueError("the tokenizer changes a text's tokens when it adds special tokens; Segue cannot truncate it")
    return len(full) - starts[0] - len(bare)


def _pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """Pool token vectors ``(batch, tokens, dim)`` into one vector per text."""
    if pooling == "cls":
        return hidden[:, 0]
    mask = mask.unsqueeze(-1).to(hidden.dtype)
    if pooling == "mean":
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
    return hidden.masked_fill(mask == 0, -1e9).max(dim=1).values


@dataclass(frozen=True)
class _Read:
    profile: ModelProfile
    model: Any
    tokenizer: Any
    pooling: str


def _read(folder: Path, options: TransformerOptions) -> _Read:
    """Load the folder on the CPU in float32 and profile it with ``options``."""
    from transformers import AutoModel, AutoTokenizer

    modules = _read_json(folder / "modules.json")
    by_type = {module["type"].rsplit(".", 1)[-1]: module for module in modules or []}
    unsupported = set(by_type) - {"Transformer", "Pooling", "Normalize"}
    if unsupported:
        raise ValueError(f"{folder}: unsupported sentence-transformers modules {sorted(unsupported)}")
    model_dir = folder / by_type["Transformer"]["path"] if "Transformer" in by_type else folder

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    try:
        model, info = AutoModel.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=options.attention,
                                                output_loading_info=True)
    except ValueError as error:  # an architecture transformers has no SDPA kernel for (MPNet): the same math, eagerly
        if options.attention != "sdpa" or "scaled_dot_product_attention" not in str(error):
            raise
        if "attention" in options.model_fields_set:
            raise OptionsError(f"option attention: {folder} has no sdpa attention in transformers: "
                               "use --option attention=eager") from None
        options = options.model_copy(update={"attention": "eager"})
        model, info = AutoModel.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager",
                                                output_loading_info=True)
    model.eval()
    # Weights missing from the checkpoint are freshly random: only an unused pooler head may be.
    random_init = set(info["missing_keys"])
    if any(key.split(".")[0] != "pooler" for key in random_init):
        raise ValueError(f"{folder}: checkpoint lacks weights {sorted(random_init)}")

    pooling_config = _read_json(folder / by_type["Pooling"]["path"] / "config.json") if "Pooling" in by_type else {}
    st_config = _read_json(model_dir / "sentence_bert_config.json") or {}
    max_tokens = st_config.get("max_seq_length") or min(tokenizer.model_max_length, model.config.max_position_embeddings)
    pooling = _pooling_mode(pooling_config, folder) if pooling_config else "mean"
    normalize = ("Normalize" in by_type) if modules is not None else True
    dim = int(pooling_config.get("word_embedding_dimension") or pooling_config.get("embedding_dimension")
              or model.config.hidden_size)
    identity = {"kind": NAME, "dim": dim, "pooling": pooling, "normalize": normalize, "max_tokens": int(max_tokens)}
    identity |= options.model_dump(exclude_defaults=True)
    weights = {name: value for name, value in model.state_dict().items() if name not in random_init}
    profile = ModelProfile(provider=NAME, dim=dim, max_tokens=int(max_tokens),
                           config={"pooling": pooling, "normalize": normalize, **options.model_dump()},
                           fingerprint=fingerprint(weights, tokenizer.get_vocab(), identity))
    return _Read(profile, model, tokenizer, pooling)


def _pooling_mode(config: dict, folder: Path) -> str:
    """The pooling of a sentence-transformers Pooling config (legacy flags or ``pooling_mode``)."""
    if "pooling_mode" in config:
        mode = config["pooling_mode"]
        modes = [mode] if isinstance(mode, str) else list(mode)
    else:
        modes = [
            ST_POOLING_FLAGS.get(key, key.removeprefix("pooling_mode_"))
            for key, on in config.items()
            if key.startswith("pooling_mode_") and on
        ]
    if len(modes) != 1 or modes[0] not in POOLINGS:
        raise ValueError(f"{folder}: unsupported pooling {modes}; Segue supports one of {POOLINGS}")
    return modes[0]


def _read_json(path: Path) -> Any:
    """The parsed JSON file, or None when it does not exist."""
    return json.loads(path.read_text()) if path.is_file() else None
