"""The paper's building blocks as plain nn.Modules."""

from ghostify.modules.ghost_module import GhostModule

__all__ = ["GhostModule"]
