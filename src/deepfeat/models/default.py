"""The model every command uses unless told otherwise. A module of its own, without PyTorch, so
that the command line can name it in its help without importing torch (docs/startup.md)."""

DEFAULT_MODEL = "efficientnet_lite0"
