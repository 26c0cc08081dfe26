"""The model side of the package: module-key rules (:mod:`osrm_lora.model.keys`).

Kept free of re-exports so that importing one submodule never pulls in the others.
"""

from __future__ import annotations
