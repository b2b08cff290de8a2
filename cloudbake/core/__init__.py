"""What every stage uses: the one error type, logging with redaction, sizes and durations, atomic files
and locks, and the one subprocess runner.

Imports nothing of cloudbake's outside this package; every other package may import it.
"""
