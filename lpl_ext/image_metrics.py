"""Deprecated alias of :mod:`lpl_ext.demo.image_metrics` (moved in 0.2.0; removed in 0.3.0)."""

from lpl_ext.demo import alias_moved_module

alias_moved_module(__name__)
