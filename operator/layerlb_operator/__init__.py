"""The control plane: kopf handlers at the edge, resolution of cluster state into Plans, status."""
