"""Answers from the ledger: reports, invoices, usage queries, repricing, reconciliation."""
