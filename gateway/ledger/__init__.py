"""The ledger: one row per call (schema, migrations, SQLite, Postgres, readers), object owners."""
