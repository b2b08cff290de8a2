"""Test runs: throwaway VMs of a published image (``Machine``), their run folders, SSH, tar transfers,
project upload, JUnit summaries, warm sets, and the test-image flow
(``cloudbake.api`` and the pytest plugin are its front doors).

Imports every stage below it (``core`` to ``image``); never ``remote``.
"""
