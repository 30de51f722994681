"""Tests of segue.embedding."""
