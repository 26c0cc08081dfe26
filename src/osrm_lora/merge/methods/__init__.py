"""Merge methods; importing this package registers all of them."""

from osrm_lora.merge.methods import data_aware, dense_misc, doge, linear, sparse, spectral  # noqa: F401
