"""Prepared datasets: the directory format written by ``neuralhead prepare`` and its readers."""
