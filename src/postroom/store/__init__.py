"""The outbox: tables, the Store implementations (SQLite, PostgreSQL), group commit, ids."""
