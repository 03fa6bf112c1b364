"""Admission: rates, calendar quotas, concurrency, queues; in-process and shared via Redis."""
