"""Executors: where the runs of a grid train. ``local`` (process pool), ``debug`` (in-process), ``slurm``."""
