"""Tests of the contracts in segue.schemas: event decoding and dead letters."""
