"""One exit status per kind of outcome, for every verb of the ``cloudbake`` command.

    0    it worked
    1    a task failed (fetch, seed, bake, push ...: the message says why)
    2    usage or pipeline error: the command line or the pipeline file is wrong
    N    test-image: the test command's own exit status
    124  the test command outran test.timeout (timeout(1)'s status)
    125  cloudbake's machinery failed (host tools, boot, SSH, upload, artifacts), not the command (docker run's)
    130  interrupted (Ctrl-C, SIGTERM, SIGHUP); everything started was cleaned up
    141  stdout was closed early (``cloudbake status | head -1``): ended quietly, as SIGPIPE would

docs/own-repository.md shows this table to users.
"""

from __future__ import annotations

from enum import IntEnum


class Exit(IntEnum):
    ok = 0
    failed = 1
    usage = 2
    timeout = 124
    machinery = 125
    interrupted = 130
    output_closed = 141
