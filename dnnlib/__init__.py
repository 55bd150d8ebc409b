"""Miscellaneous utilities shared by the whole toolkit."""

from .util import EasyDict, make_cache_dir_path

__all__ = ['EasyDict', 'make_cache_dir_path']
