"""The distribution's version: the one place it is written (pyproject.toml reads it), so
that an agent shipped without its distribution's metadata (agentless, over ssh) still
announces the version of the controller that shipped it."""

__version__ = "0.1.0"
