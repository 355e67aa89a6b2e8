"""dlc: a compiler and serving toolchain for diffusion LLMs."""
__version__ = "0.1.0"
