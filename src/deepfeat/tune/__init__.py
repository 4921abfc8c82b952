"""Choosing a pipeline for a dataset: the layer x pooling x post-processing sweep and the recipe."""
