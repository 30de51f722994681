"""Tooling for laptops, tests and the demo: embedded PostgreSQL and Kafka, the demo, model building, the bundled SciFact set."""
