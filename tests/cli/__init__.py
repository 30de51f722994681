"""Tests of segue.cli."""
