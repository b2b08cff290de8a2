"""cloudbake's JSON Schemas (a package only so that the wheel carries them as cloudbake.schema)."""
