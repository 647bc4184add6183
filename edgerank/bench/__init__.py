"""The benchmark: edgerank beside the engines a user would pick instead, each in its own process."""
