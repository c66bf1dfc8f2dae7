"""Fixtures shared by several test modules."""

from tests.jobprocs import multiproc_dir

__all__ = ["multiproc_dir"]
