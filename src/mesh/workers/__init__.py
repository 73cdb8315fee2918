"""GPU nodes joining the mesh: the registry of worker replicas (gateway side) and the agent
that runs on each node (``mesh worker``)."""
