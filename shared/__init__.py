"""Code shared by every CaraServe service: configuration, paths, model provisioning, adapter validation."""
