"""Party Chat: local language models and a human moderator talking in one room."""

__version__ = "0.1.0"
