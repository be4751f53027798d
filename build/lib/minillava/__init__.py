"""minillava: a small, readable, pure-PyTorch FSDP2 trainer for LLaVA-1.5."""

__version__ = "0.1.0"
