"""The project's own fakes of outside systems (real servers on loopback, never mocks)."""
