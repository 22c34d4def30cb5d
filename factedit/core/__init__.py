"""Contracts and types every part shares: errors, deltas, records, requests, configs and the method registry."""
