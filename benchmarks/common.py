"""What the end-to-end benchmarks share: production batch settings and the static models they distil once."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.harness runs the services and workers

from segue.devtools.modelkit import distill_static, minilm_path  # noqa: E402
from tests.harness import Harness  # noqa: E402

TEXT_CHARS = 3000  # abstracts are cut under the harness's 4,000-byte limit on a text
_TEST_SIZED = ("SEGUE_BATCH_SIZE", "SEGUE_BATCH_TIMEOUT_S", "TOKENIZERS_PARALLELISM")  # the harness's test settings
_MODELS = Path(tempfile.gettempdir()) / "segue-bench-models"


def production_env(h: Harness) -> dict[str, str]:
    """The harness's worker environment with Segue's default change batch size and window, tokenizers on every core."""
    return {key: value for key, value in h.env.items() if key not in _TEST_SIZED}


def static_model(dims: int) -> Path:
    """A model2vec model distilled from MiniLM to ``dims``, built once for every benchmark on this machine."""
    return distill_static(str(minilm_path()), _MODELS / f"static-{dims}", dims=dims)
