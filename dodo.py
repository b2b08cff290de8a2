"""cloudbake's task graph for this repository. This file only wires: the tasks are in tasks/, the engine in cloudbake/.

    doit list --deps               the tasks and what each depends on
    doit bake                      bake the base image (default task); doit -a bake bakes again
    doit test-image --cmd "..."    run a command in a throwaway VM of it
    doit <task> pipeline=FILE      work on another pipeline file

Installed elsewhere, the `cloudbake` command runs the same tasks (cloudbake/cli.py).
"""

from tasks.bake import task_bake, task_cache_key, task_prune  # noqa: F401  (doit finds task_* by name)
from tasks.context import doit_config
from tasks.docs import task_docs  # noqa: F401
from tasks.fetch import task_fetch, task_update  # noqa: F401
from tasks.inspect import task_prune_downloads, task_status, task_validate  # noqa: F401
from tasks.registry import task_pull, task_push  # noqa: F401
from tasks.seed import task_seed  # noqa: F401
from tasks.testrun import task_console, task_test_image, task_warm  # noqa: F401

# Load and validate the pipeline once, so every command (even `doit list`) reports a bad one.
DOIT_CONFIG = doit_config()
