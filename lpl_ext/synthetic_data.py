"""Deprecated alias of :mod:`lpl_ext.demo.synthetic_data` (moved in 0.2.0; removed in 0.3.0)."""

from lpl_ext.demo import alias_moved_module

alias_moved_module(__name__)
