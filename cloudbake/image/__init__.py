"""The image: the seed, the build (what the key covers, the key), the bake that boots it once, the store
that publishes ``<name>-<key>.qcow2`` with its manifest, and the read-only views of it (inspect,
explain).

Imports ``core``, ``config``, ``source`` and ``qemu``. The registry is reached through the
``SharedCache`` a caller hands to ``run_bake``, so this package never imports ``remote``.
"""
