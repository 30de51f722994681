"""The control plane: model registry, migration lifecycle and gate, HNSW indexes, plan, backfill, import, publish and dead letters."""
