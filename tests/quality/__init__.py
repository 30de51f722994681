"""Tests of segue.quality."""
