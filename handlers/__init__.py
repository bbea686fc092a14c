"""Command handlers, one module per verb family (the command plane)."""
