"""The encoder (encoder.py), its configuration and presets (config.py, on the bottom floor with the
field types: the run configuration reads it) and its Hugging Face key maps (hf/). Nothing is imported
here, so importing models.config runs nothing else of the package."""
