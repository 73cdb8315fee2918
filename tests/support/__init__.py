"""Test harnesses: real processes (gateway, test engine) and small clients for them."""
