"""Batch API jobs created through the gateway: remembered, watched until they end, billed once."""
