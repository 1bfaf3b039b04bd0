"""ptft-dist: masked-LM pretraining and parameter-efficient finetuning on clusters."""

__version__ = "0.1.0"
