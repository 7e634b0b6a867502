"""chatcli: chat with and complete text from local GGUF models."""

__version__ = "0.1.0"
