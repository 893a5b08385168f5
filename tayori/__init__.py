"""Tayori: customer database and email delivery platform."""
