"""The control plane: model registry, migration lifecycle and gate, HNSW indexes, bridging adapters, plan, backfill, import, publish and dead letters."""
