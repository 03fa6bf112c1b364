"""Key expiry reminders and budget alerts, to webhooks from an outbox in the ledger's database."""
