"""Billing exports: billable ledger rows to Stripe, OpenMeter, Lago or a webhook, once each."""
