"""What each task is, in one line: ``doit list``, ``cloudbake --help`` and ``cloudbake VERB --help`` say it.

Kept apart from the task definitions so the command's help reads it without loading a pipeline.
"""

from __future__ import annotations

SUMMARIES = {
    "fetch": "Download and verify the upstream image; pin it in the lock file",
    "update": "Re-resolve the upstream image (e.g. a new 'current') and rewrite the lock",
    "seed": "Validate the user-data and build the NoCloud seed ISO (cidata) from cloud-init/ and the pipeline",
    "bake": "Boot the upstream image once with the seed and publish <name>-<key>.qcow2",
    "cache-key": "Print the baked image's key (offline), for CI caches",
    "status": "Show the key, the lock, whether the image is baked, cache sizes and the accelerator",
    "validate": "Check the pipeline, the user-data, the lock and the host (programs, QEMU, firmware, accelerator, "
                "disk) without booting",
    "warm": "Save the baked image's warm state for this host (one boot), so test runs resume it; "
            "run it before CI saves its cache",
    "console": "Boot a throwaway VM of the baked image with its serial console on this terminal",
    "test-image": "Upload the project and run test.command (or --cmd) in throwaway VMs of the baked image",
    "push": "Push the baked image for the current key to cache.remote (blobs the registry has are skipped)",
    "pull": "Pull the image for the current key from cache.remote into the output folder (no bake)",
    "prune": "Delete all but the newest output.keep baked images of this pipeline",
    "prune-downloads": "Delete downloaded upstream images other than the ones the lock files pin",
}
