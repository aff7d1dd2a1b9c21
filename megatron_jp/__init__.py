"""megatron_jp: Megatron-style 3D-parallel pretraining of Japanese BERT-style encoders."""

__version__ = "0.1.0"
