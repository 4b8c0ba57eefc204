"""Built-in agents."""

from runservice.agents.builtin import BUILTINS, echo, ticker

__all__ = ["BUILTINS", "echo", "ticker"]
