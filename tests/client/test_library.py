"""Segue as a library other services import: one import package, no model code on import, one vocabulary.

* only ``segue`` is installed (host services have their own ``app`` packages);
* importing the reader, the contract, the registry or the CLI loads no torch, and neither
  do the commands that only read or switch state; the reader imports no tooling;
* the changelog's ``Action``/``Origin`` enums are exactly what the SQL CHECKs allow;
* a read-only session cannot write.
"""

from __future__ import annotations

import re
import subprocess
import sys

import psycopg
import pytest
import tomllib

from segue.schemas.changelog import Action, Origin
from segue.storage import connections
from tests.harness import ROOT, SEGUE, run_segue

MODEL_CODE = ("torch", "transformers", "model2vec")


def python(code: str, *, argv: list[str] = (), env: dict | None = None, cwd: str = "/") -> str:
    done = subprocess.run([sys.executable, "-c", code, *argv], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_only_the_segue_package_is_installed():
    # From / the repository is not on sys.path: only what pip installed can be imported.
    found = python(
        "import importlib.util, importlib.metadata as m\n"
        "print(sorted(n for n in ('app', 'agents', 'schemas') if importlib.util.find_spec(n)))\n"
        "import segue.client.reader, segue.agents.worker, segue.schemas.events\n"
        "print(sorted(k for k, v in m.packages_distributions().items() if 'segue' in v))"
    )
    assert found.splitlines() == ["[]", "['segue']"]
    assert SEGUE.endswith("/segue")


def test_every_subpackage_is_in_the_distribution():
    # An editable install finds any folder; a wheel holds only the packages pyproject.toml lists.
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {"app": "segue", "agents": "segue.agents", "schemas": "segue.schemas"}
    found = {".".join([folders[init.relative_to(ROOT).parts[0]], *init.relative_to(ROOT).parts[1:-1]])
             for folder in folders for init in (ROOT / folder).rglob("__init__.py")}
    assert found == listed


def test_importing_the_core_loads_no_model_code():
    loaded = python(
        "import sys\n"
        "import segue.client.reader, segue.schemas.events, segue.control.registry, segue.control.migration, segue.control.indexes, segue.cli\n"
        "import segue.embedding.engine, segue.embedding.providers, segue.storage.documents, segue.worker.pipeline\n"
        f"print([m for m in {MODEL_CODE!r} if m in sys.modules])"
    )
    assert loaded == "[]"


def test_the_client_imports_no_tooling():
    loaded = python(
        "import sys\n"
        "import segue.client.reader\n"
        "print(sorted(m for m in sys.modules if m.split('.')[:2] in (['segue', 'devtools'], ['segue', 'cli'])))"
    )
    assert loaded == "[]"


COMMAND_SCRIPT = """
import sys
from segue.cli import main
try:
    main(sys.argv[1:], standalone_mode=False)
except Exception as error:  # a refusal (no migration in progress) still ran the command's imports
    print("refused:", error)
print("MODEL CODE", [m for m in {model_code!r} if m in sys.modules])
"""


@pytest.mark.parametrize("command", [
    ["status"], ["models", "list"], ["migrate", "status"], ["migrate", "cutover"], ["migrate", "rollback"],
    ["migrate", "finish", "--grace", "0"], ["db", "upgrade"],
])
def test_commands_that_do_not_embed_load_no_model_code(harness, command):
    done = subprocess.run([sys.executable, "-c", COMMAND_SCRIPT.format(model_code=MODEL_CODE), *command],
                          env=harness.env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "MODEL CODE []" in done.stdout, done.stdout


def test_the_changelog_vocabulary_is_what_the_sql_allows(harness):
    def allowed(constraint: str) -> set[str]:
        definition = harness.scalar("SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conname = %s",
                                    (constraint,))
        return set(re.findall(r"'([a-z_]+)'::text", definition))

    assert allowed("migration_changelog_action_check") == {a.value for a in Action}
    assert allowed("migration_changelog_origin_check") == {o.value for o in Origin}


def test_read_only_commands_run_on_a_session_that_cannot_write(harness):
    with connections.connect(harness.settings, harness.database_url, read_only=True) as conn:
        assert conn.execute("SELECT count(*) FROM embedding_models").fetchone()[0] >= 2
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            conn.execute("UPDATE serving SET updated_at = now()")
    listed = run_segue("models", "list", env=harness.env).stdout
    assert "old-static" in listed and "static" in listed and "transformer" in listed


MODULES = sorted(
    f"segue.{path.relative_to(ROOT / 'app').with_suffix('').as_posix().replace('/', '.')}".removesuffix(".__init__")
    for path in (ROOT / "app").rglob("*.py") if path.name != "__main__.py"  # that one runs the command line
) + ["segue.agents.worker", "segue.schemas.events", "segue.schemas.changelog"]


TORCH_CHECK = """
import importlib, os, sys
for module in sys.argv[1:]:
    read, write = os.pipe()
    if os.fork() == 0:
        try:
            importlib.import_module(module)
            os.write(write, str("torch" in sys.modules).encode())
        except BaseException as error:
            os.write(write, repr(error).replace(" ", "_").encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as answer:
        brings_torch = answer.read()
    os.wait()
    print(module, brings_torch)
    if brings_torch == "False":
        importlib.import_module(module)
"""


def test_no_module_brings_both_torch_and_the_database_driver():
    """Model code and database code meet only in the worker's wiring, at run time, never on import.

    One interpreter forks a child per module to import it, and imports each module that brought no torch
    itself, so later children find it loaded (a fresh interpreter per module took 35 s): nothing loaded
    beforehand brings torch, so torch in a child means that module brings it. Only the modules that bring
    torch are then imported alone, each in a fresh interpreter, to look for psycopg.
    """
    checked = dict(line.split() for line in python(TORCH_CHECK, argv=MODULES).splitlines())
    assert set(checked) == set(MODULES) and set(checked.values()) <= {"True", "False"}, checked
    torch_modules = [module for module, brings_torch in checked.items() if brings_torch == "True"]
    assert "segue.embedding.providers.transformer" in torch_modules and "segue.cli" in checked
    both = [module for module in torch_modules
            if python(f"import {module}, sys; print('psycopg' in sys.modules)") == "True"]
    assert both == []
