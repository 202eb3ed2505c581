"""Shared core: settings, storage, the scan domain, rate limits and audit."""
