"""Tests of segue.worker."""
