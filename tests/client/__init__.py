"""Tests of segue.client."""
