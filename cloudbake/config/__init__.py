"""The pipeline file: typed model, hardened YAML with locations, schema problems with did-you-mean,
the ``images:``/``matrix:`` plan, and the paths a pipeline's files go to.

Imports only ``cloudbake.core``. Everything after loading sees the frozen ``Pipeline`` value.
"""
