"""The paper's experiments as code. Nothing in the core imports this package."""
