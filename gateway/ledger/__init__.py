"""The ledger: one row per call, its schema and migrations, SQLite and Postgres, readers."""
