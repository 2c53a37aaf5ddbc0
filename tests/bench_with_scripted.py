"""`bench` with the scripted test method registered, for tests that need a real process."""

from __future__ import annotations

from protobench.cli import main
from protobench.harness import registry
from tests.conftest import ScriptedMethod

if __name__ == "__main__":
    registry.register(ScriptedMethod)
    main()
