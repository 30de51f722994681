"""Segue: the engine, store, model registry, pipeline, migration control, reader, settings and CLI."""
