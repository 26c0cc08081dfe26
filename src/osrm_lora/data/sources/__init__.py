"""Data sources: built-in registry packages, local files, Hugging Face datasets."""
