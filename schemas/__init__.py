"""Segue's contracts: event records, their JSON Schemas and the SQL schema."""
