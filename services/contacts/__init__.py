"""The contacts service."""
