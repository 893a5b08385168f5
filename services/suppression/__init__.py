"""The suppression service."""
