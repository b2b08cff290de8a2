"""cloudbake: a declarative pipeline that bakes and tests VM base images (driven by doit)."""

__version__ = "0.1.0"
