"""Tests of the deployment files: docker-compose and the Dockerfile."""
