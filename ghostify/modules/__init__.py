"""The paper's building blocks as plain nn.Modules."""

from ghostify.modules.ghost_module import GhostModule
from ghostify.modules.ghost_stage import GGhostStage

__all__ = ["GGhostStage", "GhostModule"]
