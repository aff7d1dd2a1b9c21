"""The encoder (encoder.py), its presets (presets.py: plain dicts, read by megatron_jp.config, whose
`preset(name)` gives a preset's ModelConfig) and its Hugging Face key maps (hf/). Nothing is imported
here, so the config layer can read the presets beneath everything else."""
