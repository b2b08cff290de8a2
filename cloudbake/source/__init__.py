"""Where an image starts: HTTP with retries and resumable verified downloads, OpenPGP checks with gpgv,
the lock that pins an upstream image, and each distribution's mirror layout (``ubuntu``).

A new distribution is a module here beside ``ubuntu``. Imports ``core`` and ``config`` only.
"""
