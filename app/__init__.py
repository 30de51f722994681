"""Segue: zero-downtime embedding-model migrations for pgvector, driven by Kafka and Faust.

Where ``segue.x`` lives: ``segue`` is this folder (``app/``), ``segue.agents`` is ``agents/``
(the thin Faust app) and ``segue.schemas`` is ``schemas/`` (the contracts: events, JSON Schemas,
SQL); ``segue.x.y`` is ``app/x/y.py``. One subpackage per plane:

* ``segue.worker`` — the change, read-miss and backfill processors, retries, sweeper, heartbeat, ops endpoints;
* ``segue.embedding`` — the engine (scheduling, checks, normalisation) and one module per provider;
* ``segue.storage`` — connections, schema upgrades, and every SQL statement on Segue's tables;
* ``segue.control`` — registry, migration lifecycle and gate, indexes, plan, backfill, import, publish, dead letters;
* ``segue.client`` — the reader a host service imports (no tooling, no embedded services);
* ``segue.quality`` — labelled sets, evaluation, the verdict's statistics, shadow queries, the report;
* ``segue.cli`` — the ``segue`` command, one module per command group;
* ``segue.devtools`` — embedded services, the demo, model building, the bundled SciFact data.

Shared by all: ``settings``, ``errors``, ``spec``, ``metrics``, ``ratelimit``.
"""
