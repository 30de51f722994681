"""Tests of segue.control."""
