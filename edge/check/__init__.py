"""Checks of a built artifact against its source (`fidelity`)."""
