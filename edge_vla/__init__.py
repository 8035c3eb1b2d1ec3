"""edge-vla: reasoning-lite vision-language-action policies, from demonstrations to the edge."""

__version__ = "0.1.0"
