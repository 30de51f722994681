"""The storage plane: connections, schema upgrades, and the SQL statements on Segue's tables, a module per table or family."""
