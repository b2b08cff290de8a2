"""cloudbake's task graph. This file only wires: every stage lives in tasks/.

    doit list                      the tasks
    doit bake                      bake the base image (default task)
    doit test-image cmd="..."      run a command in a throwaway VM of it
    doit <task> pipeline=FILE      work on another pipeline file
"""

from tasks.bake import task_bake, task_cache_key, task_prune  # noqa: F401  (doit finds task_* by name)
from tasks.context import current
from tasks.docs import task_docs  # noqa: F401
from tasks.doitutil import SizeMtimeChecker
from tasks.fetch import task_fetch, task_update  # noqa: F401
from tasks.seed import task_seed  # noqa: F401
from tasks.testrun import task_console, task_test_image  # noqa: F401

# Load and validate the pipeline once, so every command (even `doit list`) reports a bad one.
_pipeline, _paths = current()
_paths.doit_state.parent.mkdir(parents=True, exist_ok=True)  # doit does not create its state folder

DOIT_CONFIG = {
    "default_tasks": ["bake"],
    "backend": "sqlite3",
    "dep_file": str(_paths.doit_state),
    "check_file_uptodate": SizeMtimeChecker,
    "verbosity": 2,
}
