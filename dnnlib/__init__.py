"""Miscellaneous utilities shared by the whole toolkit (spec persistence.md §5)."""

from .util import EasyDict, make_cache_dir_path

__all__ = ['EasyDict', 'make_cache_dir_path']
