"""The bounce_processor service."""
