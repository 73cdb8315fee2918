"""HTTP plumbing shared by every endpoint: bodies, streaming responses, request ids."""
