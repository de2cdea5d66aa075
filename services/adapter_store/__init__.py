"""The adapter_store service."""
