"""The fitness harness: score merged candidates per example."""
