"""Tests of segue.storage."""
