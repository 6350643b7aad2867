"""Experiment configs: each module defines ``get_config(arg)`` for ``flatjax train``."""
