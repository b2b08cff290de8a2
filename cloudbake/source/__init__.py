"""Where an image starts: HTTP with retries and resumable verified downloads, OpenPGP checks with gpgv,
the lock that pins an upstream image, and each distribution's mirror layout and verification (``ubuntu``,
``debian``, ``fedora``; ``fetch`` picks one by ``source.distro``).

A new distribution is a module here beside them, its names in ``cloudbake.config.distros``. Imports
``core`` and ``config`` only.
"""
